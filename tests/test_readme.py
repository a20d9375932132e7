"""The README's promises: its two commands, CI running the second, and a current rule graph."""

import re

from conftest import REPO, snakemake


def _readme():
    return (REPO / "README.md").read_text()


def test_readme_opens_with_the_install_and_run_and_the_test_commands():
    first_block = re.search(r"```bash\n(.*?)```", _readme(), re.S).group(1).strip().splitlines()
    assert len(first_block) == 2
    assert first_block[0].endswith("snakemake --profile profiles/local")
    assert first_block[1].endswith("pytest")
    assert first_block[1] in (REPO / ".ci" / "run").read_text()


def test_readme_rule_graph_is_current():
    documented = re.search(r"```mermaid\n(.*?)```", _readme(), re.S).group(1).strip()
    generated = snakemake(REPO, "--rulegraph", "mermaid-js").stdout.strip()
    assert sorted(documented.splitlines()) == sorted(generated.splitlines())  # edge order varies between runs
