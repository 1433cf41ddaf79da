"""The host-path probe's accounting of driver calls, on the CPU (a stand-in class for the driver)."""

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
