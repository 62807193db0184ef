"""What a run wrote for people to read: training_log.json and TensorBoard's event files."""

import json

import numpy as np

# Fields of a training_log record that depend on wall-clock time, not on the computation.
TIMING_FIELDS = ('tokens_per_s', 'mfu', 'elapsed_s')


def log_without_timing(save_dir, drop: tuple[str, ...] = ()) -> list[dict]:
    """save_dir's training_log.json without the fields that depend on wall-clock time (and
    `drop`): what two runs of the same computation must agree on exactly. save_dir may be a
    gs:// URL."""
    from etils import epath

    records = json.loads((epath.Path(str(save_dir)) / 'training_log.json').read_text())
    return [
        {k: v for k, v in record.items() if k not in TIMING_FIELDS + tuple(drop)}
        for record in records
    ]


def read_events(logdir):
    """{tag: [(step, value), ...]} of every scalar and text summary in logdir's event files."""
    # Imported here: seconds to import, and most tests read no event file.
    from tensorboard.backend.event_processing import event_accumulator

    accumulator = event_accumulator.EventAccumulator(
        str(logdir), size_guidance={event_accumulator.TENSORS: 0}
    )
    accumulator.Reload()
    events = {}
    for tag in accumulator.Tags()['tensors']:
        values = []
        for event in accumulator.Tensors(tag):
            proto = event.tensor_proto
            value = (
                proto.string_val[0].decode()
                if proto.string_val
                else float(np.frombuffer(proto.tensor_content, np.float32)[0])
                if proto.tensor_content
                else float(proto.float_val[0])
            )
            values.append((event.step, value))
        events[tag] = values
    return events
