"""The host-path probe's accounting of driver calls, on the CPU (a stand-in class for the driver)."""

import pytest

from lowlat.bench import hostpath


class _Driver:
    def launch(self, value):
        return value * 2

    def record(self):
        return None


def test_driver_clock_counts_and_times_each_kind_and_restores_the_methods():
    original_launch, original_record = _Driver.launch, _Driver.record
    driver = _Driver()
    with hostpath.DriverClock(((_Driver, "launch", "launch"), (_Driver, "record", "event record"))) as clock:
        assert _Driver.launch is not original_launch
        for i in range(4):
            assert driver.launch(i) == 2 * i  # results pass through
        driver.record()
    assert _Driver.launch is original_launch and _Driver.record is original_record
    parts = clock.per_call(2)
    assert parts["launch"][0] == 2 and parts["event record"][0] == 0.5  # per call: 4 launches and 1 record over 2 calls
    assert all(us >= 0 for _, us in parts.values())


def test_the_probe_wraps_the_host_path_driver_calls():
    kinds = {label for _, _, label in hostpath.DRIVER_CALLS}
    assert kinds == {"launch", "event record", "stream wait", "event query", "event sync"}
    for owner, name, _ in hostpath.DRIVER_CALLS:
        assert callable(getattr(owner, name))


def test_without_a_gpu_it_says_so(capsys, monkeypatch):
    monkeypatch.setattr(hostpath.torch.cuda, "is_available", lambda: False)
    assert hostpath.run([]) == 2
    assert "needs an NVIDIA GPU" in capsys.readouterr().out


def test_split_takes_host_and_driver_time_from_alternating_bursts(monkeypatch):
    """Plain and wrapped bursts alternate; the rest is each wrapped burst's time minus its driver time."""
    monkeypatch.setattr(hostpath.torch.cuda, "synchronize", lambda *a, **k: None)
    now = [0.0]
    monkeypatch.setattr(hostpath.time, "perf_counter", lambda: now[0])

    class Driver:
        def launch(self):
            now[0] += 3e-6  # 3 us inside the driver call

    driver = Driver()

    def call():
        now[0] += 2e-6  # 2 us of Python around it
        driver.launch()

    part = hostpath.split(call, count=4, repeats=3, targets=((Driver, "launch", "launch"),))
    assert part["host"] == pytest.approx(5.0) and part["driver"] == pytest.approx(3.0) and part["rest"] == pytest.approx(2.0)
    assert part["kinds"]["launch"][0] == 1 and part["kinds"]["launch"][1] == pytest.approx(3.0)
