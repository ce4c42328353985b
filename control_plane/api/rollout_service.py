"""RolloutService (SPEC §12): open, commit, show and steer roll-outs; the RolloutDriver does the work.
Calls run on the event loop, like the driver, since committing reads the xDS server's snapshots."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from mtlsgate.v1 import api_pb2, rollouts_pb2, rollouts_pb2_grpc

from control_plane.api.authorization import Caller, current_caller
from control_plane.api.errors import status_for
from control_plane.authz.identity import Identity
from control_plane.resource_names import InvalidName
from control_plane.rollouts.driver import RolloutConflict, RolloutDriver
from control_plane.rollouts.reports import store_rejects, store_shadow_rejects
from control_plane.rollouts.run import TransitionError
from control_plane.store.base import StoreError

SERVICE_NAME = "mtlsgate.v1.RolloutService"
MAX_REASON = 500
MAX_PAGE = 1000

_UNKNOWN = Caller(Identity("unknown", "none"), None)


class RolloutService(rollouts_pb2_grpc.RolloutServiceServicer):
    def __init__(self, driver: RolloutDriver) -> None:
        self.driver = driver

    async def _call(self, context: grpc.aio.ServicerContext, work: Callable[[Caller], Any]) -> Any:
        caller = current_caller() or _UNKNOWN
        try:
            return work(caller)
        except InvalidName as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except (RolloutConflict, TransitionError) as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except StoreError as exc:
            await context.abort_with_status(status_for(exc))

    @staticmethod
    def _reason(request: rollouts_pb2.RolloutRequest) -> str:
        return " ".join(request.reason.split())[:MAX_REASON]

    async def BeginRollout(self, request: rollouts_pb2.BeginRolloutRequest, context: grpc.aio.ServicerContext
                           ) -> rollouts_pb2.RolloutRun:
        return await self._call(context, lambda c: self.driver.begin(
            request.policy, c.identity.name, c.role_name, " ".join(request.description.split())[:MAX_REASON]))

    async def CommitRollout(self, request: rollouts_pb2.RolloutRequest, context: grpc.aio.ServicerContext
                            ) -> rollouts_pb2.RolloutRun:
        return await self._call(context, lambda c: self.driver.commit(request.name, c.identity.name, c.role_name))

    async def GetRollout(self, request: rollouts_pb2.RolloutRequest, context: grpc.aio.ServicerContext
                         ) -> rollouts_pb2.RolloutRun:
        return await self._call(context, lambda c: self.driver.get(request.name))

    async def ListRollouts(self, request: api_pb2.ListResourcesRequest, context: grpc.aio.ServicerContext
                           ) -> rollouts_pb2.ListRolloutsResponse:
        size = request.page_size or 100
        if not 0 < size <= MAX_PAGE:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"pageSize: must be between 0 and {MAX_PAGE}")
        items = [r for n, r in self.driver.store.state().rollouts.items() if n > request.page_token]
        page = items[:size]
        return rollouts_pb2.ListRolloutsResponse(rollouts=page,
                                                 next_page_token=page[-1].name if len(items) > size else "")

    async def PauseRollout(self, request: rollouts_pb2.RolloutRequest, context: grpc.aio.ServicerContext
                           ) -> rollouts_pb2.RolloutRun:
        return await self._call(context, lambda c: self.driver.pause(request.name, c.identity.name, c.role_name,
                                                                     self._reason(request)))

    async def ResumeRollout(self, request: rollouts_pb2.RolloutRequest, context: grpc.aio.ServicerContext
                            ) -> rollouts_pb2.RolloutRun:
        return await self._call(context, lambda c: self.driver.resume(request.name, c.identity.name, c.role_name,
                                                                      self._reason(request)))

    async def AbortRollout(self, request: rollouts_pb2.RolloutRequest, context: grpc.aio.ServicerContext
                           ) -> rollouts_pb2.RolloutRun:
        return await self._call(context, lambda c: self.driver.abort(request.name, c.identity.name, c.role_name,
                                                                     self._reason(request)))

    async def UndoRollout(self, request: rollouts_pb2.RolloutRequest, context: grpc.aio.ServicerContext
                          ) -> rollouts_pb2.RolloutRun:
        return await self._call(context, lambda c: self.driver.undo(request.name, c.identity.name, c.role_name,
                                                                    self._reason(request)))


def add_rollout_service(server: grpc.aio.Server, ctx: Any) -> None:
    """`control_plane.server.SERVICES` hook (after the xDS one, whose server it drives)."""
    driver = RolloutDriver(ctx.store, ctx.xds, rejects=store_rejects(ctx.store),
                           shadow=store_shadow_rejects(ctx.store))
    rollouts_pb2_grpc.add_RolloutServiceServicer_to_server(RolloutService(driver), server)
    ctx.rollouts = driver
    ctx.on_start.append(driver.start)
    ctx.on_shutdown.append(driver.close)
