"""TensorBoard event files without TensorFlow: the records `tf.summary` writes, from
tensorboard's own protos and record framing.

A text run must not pay TensorFlow's import (11 s and 650 MB on a 2-core host), and an
accelerator box may not have it at all. The format is small and stable: a file of TFRecord-framed
`Event` protos, the first holding `file_version`, each later one a `Summary` of tensor values
tagged with the plugin that shows them ('scalars', 'text'), as TF2's summaries are. TensorBoard,
its EventAccumulator and W&B's sync read them as they read tf.summary's.

The file is opened through etils.epath, so a gs:// save_dir writes to the bucket (there epath uses
TensorFlow's GCS client when TensorFlow is installed, so only gs:// runs import it).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import time
from collections.abc import Mapping

from etils import epath
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
from tensorboard.summary.writer import record_writer

# Distinguishes two writers that one process opens within the same second.
_FILE_COUNTER = itertools.count()


def _value(tag: str, tensor: tensor_pb2.TensorProto, plugin: str) -> summary_pb2.Summary.Value:
    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin)
    )
    return summary_pb2.Summary.Value(tag=tag, tensor=tensor, metadata=metadata)


def _scalar(value: float) -> tensor_pb2.TensorProto:
    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT,
        float_val=[float(value)],
        tensor_shape=tensor_shape_pb2.TensorShapeProto(),
    )


def _string(text: str) -> tensor_pb2.TensorProto:
    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING,
        string_val=[text.encode('utf-8')],
        tensor_shape=tensor_shape_pb2.TensorShapeProto(),
    )


class EventWriter:
    """One events.out.tfevents.* file in `logdir`; write_scalars / write_texts per step."""

    def __init__(self, logdir: str):
        directory = epath.Path(logdir)
        directory.mkdir(parents=True, exist_ok=True)
        name = (
            f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.'
            f'{next(_FILE_COUNTER)}.v2'
        )
        self.path = directory / name
        # epath's open is a file locally and a context manager around TensorFlow's GFile on
        # gs://: entered here, left in close.
        self._files = contextlib.ExitStack()
        self._file = self._files.enter_context(self.path.open('wb'))
        self._records = record_writer.RecordWriter(self._file)
        self._write(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))

    def _write(self, event: event_pb2.Event) -> None:
        self._records.write(event.SerializeToString())

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        values = [_value(tag, _scalar(value), 'scalars') for tag, value in scalars.items()]
        self._write(
            event_pb2.Event(
                wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=values)
            )
        )

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        values = [_value(tag, _string(text), 'text') for tag, text in texts.items()]
        self._write(
            event_pb2.Event(
                wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=values)
            )
        )

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._files.close()  # Closes the file once; a second call does nothing.
