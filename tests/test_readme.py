"""The README's promises: its two commands, CI running the second, and a current rule graph."""

import re

from conftest import REPO, make_workdir, snakemake


def _readme():
    return (REPO / "README.md").read_text()


def test_readme_opens_with_the_install_and_run_and_the_test_commands():
    first_block = re.search(r"```bash\n(.*?)```", _readme(), re.S).group(1).strip().splitlines()
    assert len(first_block) == 2
    assert first_block[0].endswith("snakemake --profile profiles/local")
    assert first_block[1].endswith("pytest")
    assert first_block[1] in (REPO / ".ci" / "run").read_text()


def _rule_edges(mermaid):
    """The rule graph of a mermaid flowchart as (upstream, downstream) rule names.

    Snakemake numbers the nodes in an order that varies between machines, so ids are mapped back to names.
    """
    names = dict(re.findall(r"^\s*(id\d+)\[(\w+)\]", mermaid, re.M))
    edges = re.findall(r"^\s*(id\d+) --> (id\d+)", mermaid, re.M)
    return set(names.values()), {(names[a], names[b]) for a, b in edges}


def test_readme_rule_graph_is_current(tmp_path):
    """The graph of a fresh checkout: results already there (the checkpoint done) would hide the shard jobs' edges."""
    documented = re.search(r"```mermaid\n(.*?)```", _readme(), re.S).group(1)
    generated = snakemake(make_workdir(tmp_path), "--rulegraph", "mermaid-js").stdout
    rules, edges = _rule_edges(generated)
    assert "all" in rules and ("cache_shard", "cache_index") in edges
    assert _rule_edges(documented) == (rules, edges)
