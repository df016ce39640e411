"""A run's log carries no third-party advertising: Lightning's "💡 Tip" lines are dropped, its real messages kept."""

import logging

from stlib.train.run import _quiet_third_party


def test_lightnings_tip_is_dropped_and_its_other_messages_kept(caplog):
    from lightning.pytorch.utilities import rank_zero_info

    _quiet_third_party()
    with caplog.at_level(logging.INFO):
        rank_zero_info("💡 Tip: For seamless cloud logging, try installing something")
        rank_zero_info("GPU available: False, used: False")
    messages = [r.getMessage() for r in caplog.records]
    assert "GPU available: False, used: False" in messages
    assert not any("Tip" in m for m in messages)
