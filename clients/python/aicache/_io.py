"""The one place that talks to redis-py, for the sync and async clients.

Every operation is written once, as a generator (see ``_core.py``) that
yields the commands it needs and receives their replies; the drivers here run
such a generator over a sync or an asyncio client. Errors come back into the
generator as aicache exceptions, so an operation may handle them.
"""
from __future__ import annotations

from typing import (Any, AsyncIterator, Awaitable, Callable, Dict, Generator, Iterator,
                    NamedTuple, Optional, Tuple, TypeVar, Union)

from redis.exceptions import ResponseError

from .errors import convert

T = TypeVar("T")


class Call(NamedTuple):
    """One command. Replies are never decoded: vectors are raw FP32 bytes,
    so a client made with ``decode_responses=True`` works too."""

    args: Tuple[Any, ...]
    #: For a keyless command (CONFIG GET): in a cluster, send it to the node
    #: that holds this key's slot. Keyed commands route by their first key.
    route: Optional[Any] = None


class Tx(NamedTuple):
    """Commands run in one MULTI/EXEC; the reply is the list of replies."""

    calls: Tuple[Tuple[Any, ...], ...]


Step = Union[Call, Tx]
#: An operation: yields Steps, receives each Step's reply, returns T.
Op = Generator[Step, Any, T]
#: A streaming operation: yields Steps (answered by the driver) and output
#: items (handed to the caller).
StreamOp = Generator[Any, Any, None]

Execute = Callable[[Step], Any]
AExecute = Callable[[Step], Awaitable[Any]]


def _is_cluster(client: Any) -> bool:
    return hasattr(client, "get_node_from_key")


def executor(client: Any) -> Execute:
    """Runs Steps on a ``redis.Redis`` or ``redis.cluster.RedisCluster``."""
    cluster = _is_cluster(client)

    def execute(step: Step) -> Any:
        try:
            if isinstance(step, Tx):
                with client.pipeline(transaction=True) as pipe:
                    for args in step.calls:
                        pipe.execute_command(*args)
                    return pipe.execute()
            kw: Dict[str, Any] = {"NEVER_DECODE": True}
            if cluster and step.route is not None:
                kw["target_nodes"] = client.get_node_from_key(step.route)
            return client.execute_command(*step.args, **kw)
        except ResponseError as e:
            raise convert(e) from e
    return execute


def async_executor(client: Any) -> AExecute:
    """Runs Steps on a ``redis.asyncio.Redis`` or its ``RedisCluster``."""
    cluster = _is_cluster(client)

    async def execute(step: Step) -> Any:
        try:
            if isinstance(step, Tx):
                async with client.pipeline(transaction=True) as pipe:
                    for args in step.calls:
                        pipe.execute_command(*args)
                    return await pipe.execute()
            kw: Dict[str, Any] = {"NEVER_DECODE": True}
            if cluster and step.route is not None:
                await client.initialize()  # the slot table is loaded lazily
                kw["target_nodes"] = client.get_node_from_key(step.route)
            return await client.execute_command(*step.args, **kw)
        except ResponseError as e:
            raise convert(e) from e
    return execute


def run(execute: Execute, op: "Op[T]") -> T:
    try:
        step = next(op)
        while True:
            try:
                reply = execute(step)
            except Exception as e:  # handed to the operation, which may recover
                step = op.throw(e)
            else:
                step = op.send(reply)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


async def arun(execute: AExecute, op: "Op[T]") -> T:
    try:
        step = next(op)
        while True:
            try:
                reply = await execute(step)
            except Exception as e:
                step = op.throw(e)
            else:
                step = op.send(reply)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


def iterate(execute: Execute, op: StreamOp) -> Iterator[Any]:
    try:
        item = next(op)
        while True:
            if isinstance(item, (Call, Tx)):
                try:
                    reply = execute(item)
                except Exception as e:
                    item = op.throw(e)
                else:
                    item = op.send(reply)
            else:
                yield item
                item = next(op)
    except StopIteration:
        return
    finally:
        op.close()


async def aiterate(execute: AExecute, op: StreamOp) -> AsyncIterator[Any]:
    try:
        item = next(op)
        while True:
            if isinstance(item, (Call, Tx)):
                try:
                    reply = await execute(item)
                except Exception as e:
                    item = op.throw(e)
                else:
                    item = op.send(reply)
            else:
                yield item
                item = next(op)
    except StopIteration:
        return
    finally:
        op.close()
