"""An unreachable Hugging Face Hub is detected with one short probe and treated as offline (no retry backoff)."""

from __future__ import annotations

import socket

import pytest

from perp.io.hub import hub_unreachable, offline_when_unreachable

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens once the socket closes


@pytest.fixture
def online_setting(monkeypatch):
    """No offline setting and no proxy, with the libraries' own offline flags off (conftest forces them on)."""
    for name in OFFLINE_VARIABLES + PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    try:
        import datasets.config

        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    except ImportError:
        pass
    return monkeypatch


def test_closed_endpoint_is_unreachable_and_a_listening_one_is_not(online_setting):
    port = _closed_port()
    online_setting.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert f"127.0.0.1:{port} unreachable" in hub_unreachable()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        online_setting.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub_unreachable() is None


def test_offline_setting_and_proxies(online_setting):
    online_setting.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    online_setting.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert hub_unreachable() is None  # a direct probe says nothing behind a proxy
    online_setting.setenv("HF_DATASETS_OFFLINE", "1")
    assert "offline by setting" in hub_unreachable()


def test_unreachable_hub_switches_the_libraries_offline_and_back(online_setting):
    import datasets.config
    from huggingface_hub import constants

    online_setting.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    with offline_when_unreachable() as reason:
        assert "unreachable" in reason
        assert constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE and datasets.config.HF_DATASETS_OFFLINE
    assert not constants.HF_HUB_OFFLINE and not datasets.config.HF_HUB_OFFLINE
    assert not datasets.config.HF_DATASETS_OFFLINE


def test_stock_zero_shot_task_on_an_unreachable_hub_says_so(online_setting):
    pytest.importorskip("lm_eval")
    from perp.evaluate.zeroshot import TaskDataError, validate_zeroshot

    online_setting.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(TaskDataError, match=r"task 'rte': cannot load .*Hub is 127\.0\.0\.1:\d+ unreachable .*"
                                            r"and it is not cached\); offline, pass --task-data DIR holding rte"):
        validate_zeroshot(["rte"], None, limit=2)


def test_hub_model_id_on_an_unreachable_hub_says_so(online_setting):
    from perp.errors import ModelSourceError
    from perp.models import load_model

    online_setting.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(ModelSourceError, match=r"Hub id, but the Hub is 127\.0\.0\.1:\d+ unreachable"):
        load_model("some-org/some-model-that-is-not-cached")


def test_overlapping_offline_blocks_share_one_switch(online_setting):
    """Concurrent stages: the first block out must not turn the Hub back on under the other."""
    import threading

    from huggingface_hub import constants

    online_setting.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    inside, first_left, seen = threading.Event(), threading.Event(), []

    def second_stage() -> None:
        with offline_when_unreachable():
            inside.set()
            first_left.wait(10)
            seen.append(constants.HF_HUB_OFFLINE)

    other = threading.Thread(target=second_stage)
    with offline_when_unreachable():
        other.start()
        inside.wait(10)
    first_left.set()
    other.join(10)
    assert seen == [True] and constants.HF_HUB_OFFLINE is False
