"""The FID Inception-v3 plumbing, without its real weights: a randomly initialised state dict written to a file loads,
gives 2048-d features, and FID runs end to end through the Evaluator. Nothing is downloaded."""
import pytest
import torch

from diffusion_rl.data import Dataset
from diffusion_rl.errors import ConfigError
from diffusion_rl.evaluation import EvalConfig, Evaluator
from diffusion_rl.inception import InceptionV3FID, load_inception
from diffusion_rl.feature_net import inception_feature_net


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    net = InceptionV3FID()
    for m in net.modules():  # random but non-trivial batch-norm statistics, as a trained file has
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.pth"
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}  # as the files are
    torch.save({**state, "AuxLogits.fc.weight": torch.zeros(1)}, path)  # an ImageNet head is ignored
    return path, net


def test_a_weights_file_loads_and_gives_2048_features_of_any_image_size(weights):
    path, ref = weights
    net = load_inception(path)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    gray = torch.rand(3, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        feats = net(gray)
        assert feats.shape == (3, 2048) and torch.isfinite(feats).all() and (feats >= 0).all()  # pooled ReLUs
        torch.testing.assert_close(feats, ref.eval()(gray.expand(-1, 3, -1, -1)))  # gray is repeated to RGB
        assert net(torch.rand(2, 3, 32, 32) * 2 - 1).shape == (2, 2048)
    assert inception_feature_net(str(path)).num_features == 2048


def test_fid_runs_end_to_end_on_inception_features(weights):
    g = torch.Generator().manual_seed(0)
    data = Dataset("tiny", torch.rand(12, 1, 8, 8, generator=g) * 2 - 1, torch.arange(12) % 2, 2, "image")
    ev = Evaluator(data, EvalConfig(features="inception", inception_weights=str(weights[0]), n_samples=6,
                                    nfe_grid=(1,)))
    assert ev.feature_info["feature_net"].startswith("inception-v3")
    near = ev.score(data.x[:6])
    far = ev.score(torch.ones(6, 1, 8, 8))  # a blank image, far from the data
    assert near.keys() >= {"fid", "kid"} and all(map(lambda v: v == v, near.values()))
    assert 0 <= near["fid"] < far["fid"]


def test_bad_weights_files_are_refused_naming_the_file_and_the_layers(tmp_path, weights):
    with pytest.raises(ConfigError, match="does not exist"):
        load_inception(tmp_path / "none.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="cannot be read as a torch state dict"):
        load_inception(tmp_path / "junk.pth")
    state = torch.load(weights[0], weights_only=True)
    state.pop("Mixed_7c.branch_pool.conv.weight")
    state["Mixed_5b.branch1x1.conv.weight"] = torch.zeros(1, 1, 1, 1)
    torch.save(state, tmp_path / "cut.pth")
    with pytest.raises(ConfigError, match=r"missing: \['Mixed_7c.branch_pool.conv.weight'\]; wrong shape: "
                                          r"\['Mixed_5b.branch1x1.conv.weight'\]"):
        load_inception(tmp_path / "cut.pth")
    with pytest.raises(ConfigError, match="only used with features 'inception'"):
        EvalConfig(inception_weights=str(weights[0]))


def test_tf1_resize_reads_input_position_i_times_in_over_out_without_half_pixel_offset():
    from diffusion_rl.inception import resize_bilinear_tf1

    x = torch.tensor([0.0, 10.0, 20.0, 30.0]).reshape(1, 1, 1, 4).expand(1, 1, 4, 4)
    out = resize_bilinear_tf1(x, 8)  # positions 0, 0.5, 1, ..., 3.5 (the last clamps to pixel 3)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.0, 5, 10, 15, 20, 25, 30, 30]))
    torch.testing.assert_close(out, out[:, :, :1].expand_as(out))  # constant along the other axis
    torch.testing.assert_close(resize_bilinear_tf1(x, 4), x)  # same size: unchanged
