"""The CUDA path's known risks, checked where they can be: on the CPU, and on a GPU when present."""

import copy
import dataclasses
import io

import PIL.Image
import pytest
import torch

import model_handler
from errors import ModelLoadError
from model_handler import model_fingerprint, select_device
from support import NO_CUDA, body, first_masks, make_frames, mask_shape
from tracking import TrackingService


def test_image_encoder_gets_a_contiguous_nchw_tensor(tracker, monkeypatch):
    # The official loader fills a contiguous [N, 3, S, S] tensor; a permuted HWC array would reach
    # the encoder channels-last, and cuDNN may then choose another convolution kernel.
    seen = []
    forward_image = tracker.model.forward_image

    def recording(img):
        seen.append((img.shape, img.is_contiguous(), img.is_contiguous(memory_format=torch.channels_last)))
        return forward_image(img)

    monkeypatch.setattr(tracker.model, "forward_image", recording)
    tracker.preprocess(PIL.Image.open(io.BytesIO(make_frames(1)[0])))
    size = tracker.image_size
    assert seen == [((1, 3, size, size), True, False)]


class _FakeCuda:
    """Two visible GPUs, recording which one is made current."""

    def __init__(self, monkeypatch, count=2):
        self.current = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: self.current.append(torch.device(d)))


@pytest.mark.parametrize("name, expected", [("cuda", "cuda:0"), ("cuda:0", "cuda:0"), ("cuda:1", "cuda:1")])
def test_the_configured_gpu_is_made_the_current_device(monkeypatch, name, expected):
    # sam2's hole-filling kernel runs on the current device's stream: on cuda:1 it must be 1.
    cuda = _FakeCuda(monkeypatch)
    assert select_device(name) == torch.device(expected)
    assert cuda.current == [torch.device(expected)]


def test_a_gpu_that_is_not_there_is_refused_at_start_up(monkeypatch):
    _FakeCuda(monkeypatch, count=1)
    with pytest.raises(ModelLoadError, match="only 1 CUDA device"):
        select_device("cuda:1")


def test_cpu_touches_no_cuda_state(monkeypatch):
    cuda = _FakeCuda(monkeypatch)
    assert select_device("cpu") == torch.device("cpu")
    assert cuda.current == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_loading_on_a_real_gpu_makes_it_current(settings):
    index = torch.cuda.device_count() - 1  # the last GPU, so that N > 0 where there are several
    tracker = model_handler.load_tracker(dataclasses.replace(settings, device=f"cuda:{index}"))
    assert tracker.device == torch.device("cuda", index)
    assert torch.cuda.current_device() == index


def test_fingerprint_covers_device_type_and_precision(settings, tracker):
    # The loaded tracker's own config, overrides and weights; only the device changes.
    digest = model_handler._file_digest(settings.checkpoint)
    args = (settings.config, settings.config_overrides, digest)
    assert model_fingerprint(*args, torch.device("cpu")) == tracker.fingerprint
    on_gpu = model_fingerprint(*args, torch.device("cuda", 0))
    assert on_gpu != tracker.fingerprint
    # The GPU index is not part of it: a state moves freely between replicas on different GPUs.
    assert model_fingerprint(*args, torch.device("cuda", 1)) == on_gpu


def test_a_state_made_on_another_device_must_be_reinitialized(function):
    # A redeploy from CPU to GPU: the same store, a replica whose fingerprint is the CUDA one.
    frames = make_frames(2)
    states = function.track(frames[0], shapes=[mask_shape(first_masks()[0])])["states"]
    service = function.context.user_data.service
    on_gpu = copy.copy(service.tracker)
    settings = function.context.user_data.settings
    digest = model_handler._file_digest(settings.checkpoint)
    on_gpu.fingerprint = model_fingerprint(settings.config, settings.config_overrides, digest, torch.device("cuda"))
    replica = TrackingService(on_gpu, service.store, polygon_tolerance=1.0)
    function.context.user_data.service = replica
    try:
        status, answer = function.call(body(frames[1], states=states))
    finally:
        function.context.user_data.service = service
    assert status == 409
    assert "states[0]" in answer["error"] and "re-initialize" in answer["error"]
