"""bench/bench_trial_cost.py's arithmetic (`make bench-trial-cost`): which pods are a trial's, the spans between what
the watches and the log tail saw, the gap between trials, and the summary's fixed cost and ratio; pure functions of
the times seen."""

from __future__ import annotations

from bench.bench_trial_cost import GAP, HEADLINE, SPANS, Seen, gap, report, trial_times

NS = "bench-image"


def seen_trial(seen: Seen, trial: str, t0: float, linger: float) -> None:
    """One trial's story, every step a second after the one before except the linger."""
    vpod, tpod = f"{trial}-validate-abcde", f"{trial}-train-1-0-fghij"
    story = [(trial, "added"), (f"{trial}-validate", "added"), (vpod, "added"), (vpod, "phase:Running"),
             (vpod, "phase:Succeeded"), (f"{trial}-train-1", "added"), (tpod, "added"), (tpod, "phase:Running"),
             (tpod, "line"), (tpod, "event:metrics"), (tpod, "event:phase:training"), (tpod, "event:train"),
             (tpod, "last:train"), (tpod, "event:phase:uploading"), (tpod, "event:published")]
    t = t0
    for name, what in story:
        seen.note(NS, name, what, t)
        t += 1
    t += linger - 1
    for name, what in ((tpod, "phase:Succeeded"), (f"{trial}-train-1", "complete"), (trial, "phase:Succeeded")):
        seen.note(NS, name, what, t)
        t += 1


def test_a_trials_spans_come_from_its_own_pods_and_jobs():
    seen = Seen()
    seen_trial(seen, "trials-1", 100.0, linger=30)
    seen_trial(seen, "trials-10", 500.0, linger=0.5)  # a name that starts like the first one's
    spans = [3, 1, 1, 2, 1, 1, 1, 1, 1, 1, 30, 1, 1]  # the training pod comes a second after its Job
    assert trial_times(seen, NS, "trials-1") == {
        "create -> first step": 11, "last step -> Succeeded": 2 + 30 + 2,
        **{header: span for (header, _, _), span in zip(SPANS, spans, strict=True)}}
    assert trial_times(seen, NS, "trials-10")["published -> pod ended (linger, exit)"] == 0.5
    assert trial_times(seen, NS, "trials-2") == {h: None for h, _, _ in HEADLINE + SPANS}  # never seen


def test_the_gap_runs_from_the_previous_trials_success_or_the_sweeps_creation():
    seen = Seen()
    seen.note(NS, "sweep:trials", "added", 99.5)
    seen_trial(seen, "trials-0", 100.0, linger=0)
    seen_trial(seen, "trials-1", 120.0, linger=0)
    assert gap(seen, NS, None, "trials-0") == 0.5
    assert gap(seen, NS, "trials-0", "trials-1") == 120.0 - seen.get(NS, "trials-0", "phase:Succeeded")


def test_the_summary_means_the_trials_that_reuse_the_cache_and_compares_the_modes():
    def times(first: float, last: float) -> dict:
        return {GAP: 0.1, HEADLINE[0][0]: first, HEADLINE[1][0]: last, **{h: 1.0 for h, _, _ in SPANS}}

    results = {"image": [("trials-0", times(20, 33)), ("trials-1", times(10, 32)), ("trials-2", times(12, 34))],
               "podmonitor-off": [("trials-0", times(20, 3)), ("trials-1", times(9, 3)), ("trials-2", times(11, 2))]}
    text = report(results, {"image": 200.0, "podmonitor-off": 60.0}, "header")
    assert "| image | mean, cache reused | 11.0 | 33.0 |" in text  # trials-0 built the cache: not in the mean
    assert "- image: a trial that reuses the cache, mean: create -> first step 11.0 s, last step -> Succeeded " \
           "33.0 s: fixed cost 44.0 s; the whole sweep (created -> ended) 200.0 s" in text
    assert "fixed cost 12.5 s" in text
    assert "- podmonitor-off / image, fixed cost: 0.28; the whole sweep: 0.30" in text
