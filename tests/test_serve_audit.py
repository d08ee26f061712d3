"""The live audit without Ray: the monitor's states, its false-drift rate, --adapt, and the terminal's
watch."""

import numpy as np

from tinysaver.serve import AuditMonitor


def feed(m, rng, n, exit_p, disagree_p):
    for _ in range(n):
        early = rng.random() < exit_p
        audit = early and rng.random() < m.fraction
        rec = m.request(early, audit)
        if audit:
            m.audited(rec, rng.random() < disagree_p)


def test_the_audit_monitor_separates_certified_uncertain_and_drift():
    import random

    rng = random.Random(1)
    m = AuditMonitor(fraction=1.0, delta=0.1, tolerance_points=5.0)
    assert m.state == "uncertain" and m.view()["more_requests"] > 0
    feed(m, rng, 400, exit_p=0.7, disagree_p=0.0)
    assert m.state == "certified" and m.view()["loss_points"]["upper"] <= 5.0 and m.changes[0][1:] == ("uncertain",
                                                                                                      "certified")
    feed(m, rng, 400, exit_p=0.7, disagree_p=0.5)  # the traffic shifts: a third of all answers now differ
    assert m.state == "drift" and m.view()["loss_points"]["lower"] > 5.0 and m.alarm
    few = AuditMonitor(fraction=0.05, delta=0.1, tolerance_points=1.0)
    feed(few, rng, 300, exit_p=0.7, disagree_p=0.0)
    v = few.view()  # 300 clean requests at 5 % audits cannot certify 1 point: uncertain, never drift
    assert v["state"] == "uncertain" and v["more_requests"] > 1000 and v["more_audits"] > 0
    off = AuditMonitor(fraction=0.0, delta=0.1, tolerance_points=1.0)
    off.request(True)
    assert off.state == "off" and off.view()["loss_points"] is None
    rec = few.request(True, audit=True)
    assert few.view()["pending"] == 1
    few.dropped()
    assert few.view()["pending"] == 0 and few.view()["dropped"] == 1 and rec[1] is None


def test_checking_after_every_request_keeps_false_drift_below_delta():
    """Anytime validity, seeded: streams whose loss sits exactly at the tolerance, checked after
    every request, call drift in at most δ of them (plus sampling slack)."""
    import random

    delta, streams, alarms = 0.1, 300, 0
    for seed in range(streams):
        rng = random.Random(seed)
        m = AuditMonitor(fraction=0.5, delta=delta, tolerance_points=10.0)
        feed(m, rng, 600, exit_p=0.5, disagree_p=0.2)  # loss = 0.5 × 0.2 = 10 points: the hardest null
        alarms += any(to == "drift" for _, _, to in m.changes)
    assert alarms / streams <= delta + 3 * (delta * (1 - delta) / streams) ** 0.5, alarms


def _clean(c):
    return 0.3 * (1 - c)


def _shifted(c):
    return np.where(c < 0.97, 0.5, 0.02)


def _true_loss(t, p) -> float:
    """Points lost against the base at threshold t, for c ~ U(0, 1)."""
    cs = np.linspace(0, 1, 200_001)
    return 100 * float(np.mean((cs >= t) * p(cs)))


def _replay(adapter, regimes, rng):
    """(early, lost) per request, each answered at the threshold in use when it arrived."""
    from tinysaver.serve.adapt import replay

    out = []
    for n, p in regimes:
        c = rng.random(n)
        dis = rng.random(n) < p(c)
        for ci, di in zip(c.tolist(), dis.tolist()):
            early = replay(adapter, int(di), ci, 0, rng.random)  # the base says 0
            out.append((early, early and di))
    return np.array(out)


def test_adapt_raises_the_threshold_on_drift_and_lowers_it_only_on_fresh_audits():
    from tinysaver.serve.adapt import ThresholdAdapter

    fraction, tol, t0 = 0.2, 2.0, 0.8
    fixed = _true_loss(t0, _shifted)
    certified = []
    lowered_after = 0
    for seed in range(8):
        ad = ThresholdAdapter(t0, fraction, 0.1, tol, seed=seed)
        out = _replay(ad, [(5000, _clean), (10000, _shifted), (20000, _clean)], np.random.default_rng(seed))
        sw = ad.switches
        assert all(s["request"] > 5000 for s in sw), sw  # nothing moves on clean traffic
        assert sw and sw[0]["why"] == "drift" and sw[0]["to"] > t0, sw  # the shift raises it
        post = out[5000:15000]
        assert 100 * post[:, 1].mean() < fixed / 2 and post[:, 0].mean() > 0.02  # less lost, exits kept
        for s in sw:
            if s["why"].startswith("certified"):  # certified on fresh audits: truly within the tolerance
                regime = _shifted if s["request"] <= 15000 else _clean
                certified.append(_true_loss(s["to"], regime) <= tol)
        lowered_after += ad.threshold is not None and ad.threshold <= 0.9
    assert certified and all(certified)
    assert lowered_after >= 3, lowered_after  # back near the calibrated threshold once clean traffic returns


def test_an_audit_from_an_ended_epoch_is_ignored():
    from tinysaver.serve.adapt import ThresholdAdapter

    ad = ThresholdAdapter(0.8, 1.0, 0.1, 1.0)
    pending = ad.request(True, True, 1, 0.85, None)
    ad.audited(ad.request(True, True, 1, 0.95, None), True)  # a confident disagreement: drift at once
    # the epoch's one audit lost points at 0.95 and above, none at 0.98: the lowest grid point that fits
    assert ad.switches == [{"request": 2, "from": 0.8, "to": 0.98, "why": "drift"}]
    assert ad.threshold == 0.98 and ad.state == "uncertain" and ad.monitor.n == 0
    ad.audited(pending, True)  # the old epoch's audit returns: the new monitor never saw its request
    assert ad.monitor.n == 0 and ad.monitor.hits == 0
    view = ad.view()
    assert view["adapt"]["threshold"] == ad.threshold and view["adapt"]["switch_count"] == 1


def test_the_terminal_watch_prints_each_state_change_and_threshold_change_once(monkeypatch, capsys):
    import io
    import json
    import urllib.request

    from tinysaver.serve.lifecycle import AuditWatch

    base = {"requests": 10, "tolerance_points": 1.0, "loss_points": {"lower": 0.0, "upper": 3.0},
            "more_requests": 900}
    sw = {"request": 40, "from": 0.9, "to": 0.98, "why": "drift"}
    bodies = [{"state": "uncertain"}, {"state": "uncertain"}, {"state": "drift"},
              {"state": "uncertain", "adapt": {"switch_count": 1, "switches": [sw]}},
              {"state": "uncertain", "adapt": {"switch_count": 2, "switches": [sw, {**sw, "from": 0.98, "to": None}]}}]
    replies = iter(json.dumps({"audit": {**base, **b}}).encode() for b in bodies)
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(next(replies)))
    watch = AuditWatch("http://127.0.0.1:1/healthz", every_s=0.0)
    for _ in bodies:
        watch.poll()
    err = capsys.readouterr().err.splitlines()
    assert err == ["tinysaver: audit drift after 10 requests: loss against the base in [0.00, 3.00] points, "
                   "tolerance 1.00",
                   "tinysaver: adapt: threshold 0.9 → 0.98 after 40 requests (drift)",  # and a fresh audit:
                   "tinysaver: audit uncertain after 10 requests: loss against the base in [0.00, 3.00] points, "
                   "tolerance 1.00; about 900 more requests would certify it",
                   "tinysaver: adapt: threshold 0.98 → ∞ (the base alone) after 40 requests (drift)"], err
