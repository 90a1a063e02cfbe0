"""Triton's gRPC stream API for the built-in generator's closed loop: requests serialised once.

Profiled, the built-in generator's cost per request was grpc.aio's unary call, not building the request;
a stream carries many requests for less (bench/fidelity.py: the ceiling and the client's CPU per request).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["STREAM_SLOTS", "StreamChannel", "Watchdog", "end_of_stream", "stream_slots"]

# Closed-loop clients per gRPC stream: one stream carries a few in flight cheaply, but not a hundred.
STREAM_SLOTS = 16
STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"


def stream_slots(clients: int) -> list[range]:
    """Closed-loop clients split over streams of at most ``STREAM_SLOTS`` (one stream caps throughput)."""
    streams = max(1, math.ceil(clients / STREAM_SLOTS))
    bounds = [round(i * clients / streams) for i in range(streams + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(streams)]


class Watchdog:
    """Cancels a stream, and the task using it, when no response has come for ``timeout_s``.

    A stream has no per-request deadline, and cancelling the stream alone does not always wake its
    user: grpc.aio's ``write()`` on a stream cancelled before its headers were sent (a stopped server)
    waits on an event that is never set. Cancelling the ``owner`` task ends any await it is in.
    """

    def __init__(self, stream, timeout_s: float, owner: asyncio.Task | None = None) -> None:
        self.stream = stream
        self.timeout_s = timeout_s
        self.owner = owner
        self.last = time.perf_counter()
        self.fired = False
        self.task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.timeout_s))
            if time.perf_counter() - self.last > self.timeout_s:
                self.fired = True
                self.stream.cancel()
                if self.owner is not None:
                    self.owner.cancel()
                return

    def stop(self) -> None:
        self.task.cancel()


class StreamChannel:
    """Triton's gRPC stream API with each sample's request serialised once.

    A request is its sample's bytes plus a few bytes naming its slot (``id``): protobuf merges
    concatenated messages, so nothing is serialised per request.
    """

    def __init__(self, url: str, model_name: str, samples: Sequence[Mapping[str, np.ndarray]]) -> None:
        import grpc
        from tritonclient.grpc import service_pb2

        self.channel = grpc.aio.insecure_channel(url, options=_CHANNEL_OPTIONS)
        self.method = self.channel.stream_stream(
            STREAM_METHOD,
            request_serializer=None,  # the requests are bytes already
            response_deserializer=service_pb2.ModelStreamInferResponse.FromString,
        )
        self.requests = [_serialised_request(service_pb2, model_name, sample) for sample in samples]
        self.slot_ids: dict[int, bytes] = {}
        self.request_type = service_pb2.ModelInferRequest

    def open(self, headers: Mapping[str, str] | None):
        return self.method(metadata=tuple(headers.items()) if headers else None)

    def request(self, index: int, slot: int) -> bytes:
        suffix = self.slot_ids.get(slot)
        if suffix is None:
            suffix = self.slot_ids[slot] = self.request_type(id=str(slot)).SerializeToString()
        return self.requests[index % len(self.requests)] + suffix

    async def close(self) -> None:
        await self.channel.close()


def _serialised_request(service_pb2, model_name: str, sample: Mapping[str, np.ndarray]) -> bytes:
    from tritonclient.utils import np_to_triton_dtype, serialize_byte_tensor

    request = service_pb2.ModelInferRequest(model_name=model_name)
    for name, array in sample.items():
        datatype = np_to_triton_dtype(array.dtype)
        tensor = request.inputs.add(name=name, datatype=datatype)
        tensor.shape.extend(array.shape)
        # BYTES travel length-prefixed (Triton's raw format for strings); numbers as their memory.
        raw = serialize_byte_tensor(array) if datatype == "BYTES" else np.ascontiguousarray(array)
        request.raw_input_contents.append(raw.tobytes())
    return request.SerializeToString()


def end_of_stream():
    import grpc

    return grpc.aio.EOF


# tritonclient's own limits: any tensor the server accepts, in and out.
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
]
