"""The benchmark scripts' pure parts: variant parsing (one caster with the CLI), summaries and report tables."""
import pytest

from benchmarks.compare import parse_variant, summarise
from benchmarks.report import markdown_table
from diffusion_rl.cli import Args
from diffusion_rl.errors import ConfigError


def test_parse_variant_casts_with_the_cli_caster():
    label, args = parse_variant("td:estimator=td_lambda,n_steps=3,lmbda=0.25,stride=6", Args())
    assert label == "td:estimator=td_lambda,n_steps=3,lmbda=0.25,stride=6"
    assert (args.method, args.estimator, args.n_steps, args.lmbda, args.stride) == ("td", "td_lambda", 3, 0.25, "6")
    with pytest.raises(ConfigError, match="unknown option 'bogus'"):
        parse_variant("td:bogus=1", Args())
    with pytest.raises(ConfigError, match="n_steps='x' must be of type int"):
        parse_variant("td:n_steps=x", Args())
    with pytest.raises(ConfigError, match="key=value"):
        parse_variant("td:n_steps", Args())


def test_summary_and_table_give_mean_and_spread_over_seeds():
    recs = [{"variant": v, "nfe": 3, "metric": "fid", "value": x} for v, x in
            [("baseline", 70.0), ("baseline", 80.0), ("td", 40.0), ("td", 42.0)]]
    summary = summarise(recs)
    by = {s["variant"]: s for s in summary}
    assert by["baseline"]["mean"] == 75.0 and by["td"]["std"] == pytest.approx(1.41421356)
    table = markdown_table(summary, "fid")
    assert "| baseline | 75.0 ± 7.07 |" in table and "| td | 41.0 ± 1.41 |" in table
