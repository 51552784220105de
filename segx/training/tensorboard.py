"""TensorBoard as segx writes it: the Scalars page opens on the train/ and val/ curves, and the HParams table opens on
what a sweep compares."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pytorch_lightning.loggers import TensorBoardLogger as LightningTensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only

#: How many hyperparameters TensorBoard's HParams table ticks when it opens: the first five of those flagged
#: `differs` (its frontend sorts them first), the others listed unticked.
SHOWN = 5
#: Shown after the swept keys, while there is room.
HEADLINE_CHOICES = ("model", "optimizer", "optimizer.lr", "loss")


class TensorBoardLogger(LightningTensorBoardLogger):
    """Lightning's TensorBoard logger without the `epoch` scalar it adds to every write: that card would open the
    Scalars page ahead of the curves, and the step axis already orders them."""

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        super().log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step)


def shown_hparams(swept: Sequence[str], hparams: Mapping[str, Any]) -> list[str]:
    """The hyperparameters the HParams table ticks: the sweep's keys first, then the headline choices."""
    shown = [k for k in dict.fromkeys([*swept, *HEADLINE_CHOICES]) if k in hparams]
    return shown[:SHOWN]


def _kind(value: Any) -> tuple[str, Any]:
    """The HParams data type of a value and the value as that type stores it (a protobuf Value field's name)."""
    if isinstance(value, bool):
        return "bool_value", value
    if isinstance(value, int | float):
        return "number_value", float(value)
    return "string_value", str(value)


def _hparam_info(name: str, value: Any, shown: bool) -> Any:
    from tensorboard.plugins.hparams import api_pb2

    kind = {"bool_value": api_pb2.DATA_TYPE_BOOL, "number_value": api_pb2.DATA_TYPE_FLOAT64,
            "string_value": api_pb2.DATA_TYPE_STRING}[_kind(value)[0]]
    # `differs` is what TensorBoard's table sorts and ticks by: set for the keys it should open on.
    return api_pb2.HParamInfo(name=name, type=kind, differs=shown)


def _set_value(field: Any, value: Any) -> None:
    name, stored = _kind(value)
    setattr(field, name, stored)


def write_hparams(logger: LightningTensorBoardLogger, hparams: Mapping[str, Any], shown: Sequence[str],
                  metrics: Mapping[str, str], step: int = 0) -> None:
    """The run's session for the HParams tab: `hparams` (name → value), `shown` ticked, and `metrics` (scalar tag →
    column title) read from the last value of each tag."""
    import time

    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    experiment = api_pb2.Experiment(
        hparam_infos=[_hparam_info(name, value, name in shown) for name, value in hparams.items()],
        metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag), display_name=title)
                      for tag, title in metrics.items()])
    start = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    for name, value in hparams.items():
        _set_value(start.hparams[name], value)
    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS, end_time_secs=time.time())
    writer = logger.experiment._get_file_writer()  # as Lightning's own log_hyperparams writes them
    for tag, data in ((metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment)),
                      (metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_start_info=start)),
                      (metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=end))):
        summary = Summary(value=[Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(data))])
        writer.add_summary(summary, step)
    writer.flush()
