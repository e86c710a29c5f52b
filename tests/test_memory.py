"""Memory a request holds does not grow with its objects' prompt sizes (bench/bench_memory.py
measures whole requests; this checks the part CI can afford: validating the prompts)."""

import tracemalloc

from tracking import ObjectRequest


def test_validating_128_full_frame_polygons_on_an_8k_frame_holds_one_frame_at_a_time(function):
    service = function.context.user_data.service
    width, height = 7680, 4320
    polygon = {"type": "polygon", "points": [0, 0, width - 1, 0, width - 1, height - 1, 0, height - 1]}
    objects = [ObjectRequest(shape=polygon, state=None)] * 128
    tracemalloc.start()
    try:
        todo = [service._validate(obj, index=i, width=width, height=height, frame_digest=b"")
                for i, obj in enumerate(objects)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(todo) == 128
    # One frame is 33 MB of pixels; 128 of them held at once would be 4.2 GB.
    assert peak < 3 * width * height, peak
    assert todo[0].prompt.mask.all()  # and each still becomes the full-frame mask when started
