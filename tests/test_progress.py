"""Progress display: plain lines (no bar frames) when stderr is not a terminal, rounds and
iterations inside long stages, and nothing at all when nobody watches."""

from __future__ import annotations

import io

from atp import progress


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_non_terminal_gets_plain_lines(monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    out = io.StringIO()
    d = progress.Display(True, 2, stream=out)
    with d.stage("optimise (cpu)"):
        progress.tick(round=1)
        progress.tick(iteration=10)
        progress.tick(round=2)  # a new round clears the inner iteration count
    with d.stage("sequence"):
        pass
    d.close()
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    assert text.splitlines() == ["atp: [1/2] optimise (cpu)",
                                 "atp:     optimise (cpu): round 1",
                                 "atp:     optimise (cpu): round 1, iteration 10",
                                 "atp:     optimise (cpu): round 2",
                                 "atp: [2/2] sequence"]


def test_non_terminal_inner_lines_are_throttled(monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 3600.0)
    out = io.StringIO()
    d = progress.Display(True, 1, stream=out)
    with d.stage("optimise (cpu)"):
        for it in range(1000):
            progress.tick(iteration=it)
    assert out.getvalue().splitlines() == ["atp: [1/1] optimise (cpu)"]


def test_terminal_gets_a_bar_with_the_inner_progress():
    out = _Tty()
    d = progress.Display(True, 3, stream=out)
    with d.stage("optimise (cpu)"):
        progress.tick(round=2, iteration=140)
    d.close()
    assert "optimise (cpu)" in out.getvalue() and "round 2, iteration 140" in out.getvalue()


def test_tick_without_a_display_does_nothing_and_disabled_is_silent():
    progress.tick(round=1)  # no display active: a no-op
    out = io.StringIO()
    d = progress.Display(False, 1, stream=out)
    seen = []
    with d.stage("x"):
        progress.tick(round=1)
    with progress.reporting(seen.append):
        progress.tick(step="report.html")
    assert out.getvalue() == "" and seen == [{"step": "report.html"}]


def test_pipeline_stages_on_a_pipe_are_lines(capsys, monkeypatch):
    from atp.plans import StageTimer

    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    stages = StageTimer(True, total=2)  # stderr is captured: not a terminal
    stages.run("build problem", lambda: None)
    stages.run("optimise (cpu)", lambda: progress.tick(round=3))
    stages.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    assert "atp: [2/2] optimise (cpu)" in err and "round 3" in err
    assert set(stages.timings) == {"build problem", "optimise (cpu)"}


def test_optimiser_reports_rounds_and_iterations():
    from atp.optimizer.solve import optimize
    from atp.optimizer.testing import problem_bank

    case = problem_bank()[1]
    seen: list[dict] = []
    with progress.reporting(seen.append):
        optimize(case.problem, "cpu", max_iter=200, tol=0.0)
    assert any("iteration" in f for f in seen)


def test_a_stage_found_needed_later_grows_the_count():
    """A kept correction round adds its own field-dose stage: [3/3], never [3/2]."""
    out = io.StringIO()
    d = progress.Display(True, 2, stream=out)
    for name in ("sequence", "field dose"):
        with d.stage(name):
            pass
    d.grow(1)
    with d.stage("field dose"):
        pass
    d.close()
    assert out.getvalue().splitlines()[-1] == "atp: [3/3] field dose"


def test_replan_of_a_sequenced_plan_counts_its_stages(phantom, toy, capsys, monkeypatch):
    """`atp replan` of a sequenced plan showed [8/7] ... [10/7]: its count left out the
    sequencing stages."""
    import re

    import atp

    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    base = atp.plan(phantom, site="hn", predictor="baseline", dij=toy, backend="cpu",
                    progress=False, sequence="imrt-sns", optimizer_options={"max_iter": 60})
    capsys.readouterr()
    atp.replan(base, set={"Parotid_L.Dmean.tolerance": -40}, warm=True, progress=True)
    counts = [tuple(map(int, m)) for m in
              re.findall(r"atp: \[(\d+)/(\d+)\]", capsys.readouterr().err)]
    assert counts and all(k <= n for k, n in counts), counts
    assert any(k == n for k, n in counts[-3:]), str(counts)
