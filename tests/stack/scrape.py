"""bloblo's /metrics as a test reads it: every sample by name and labels, and how one moved."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.stack.procs import local_session

Samples = dict[tuple[str, tuple], float]


def scrape(bloblo) -> Samples:
    """Every sample /metrics shows now, keyed by (name, sorted label items)."""
    with local_session() as session:
        answer = session.get(f"{bloblo.url}/metrics", timeout=30)
    assert answer.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    """How far the sample name{labels} moved between two scrapes (absent counts as 0)."""
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)
