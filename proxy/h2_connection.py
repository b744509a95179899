"""The h2 library's connection object, with the one change both HTTP/2 sides of the proxy need.

RFC 9113 6.8: a GOAWAY with NO_ERROR is graceful; the streams it lets finish (up to its last
stream id) go on, and the connection closes once they are done. The `h2` library (checked
against 4.4) instead moves its connection state machine to CLOSED on any received GOAWAY and
drops what was queued to send (python-hyper/h2#1181), after which every frame either way raises
ProtocolError: a gRPC server shutting down or reaching max_connection_age (GOAWAY, then a PING)
would cut every call under way, and a client's graceful GOAWAY would lose the responses it is
still waiting for. `H2Connection` keeps the state and the queued bytes on a graceful GOAWAY; the
event (ConnectionTerminated) is still delivered, and the owner stops opening or accepting new
streams. This overrides one private method (the only hook there is); pyproject.toml pins h2 below
5 so a release that changes it is a deliberate upgrade.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import h2.connection
from h2.errors import ErrorCodes

if TYPE_CHECKING:
    from h2.events import Event
    from hyperframe.frame import Frame, GoAwayFrame


class H2Connection(h2.connection.H2Connection):
    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Frame], list[Event]]:
        if frame.error_code != ErrorCodes.NO_ERROR:
            return super()._receive_goaway_frame(frame)
        state = self.state_machine.state
        queued = self.data_to_send()
        frames, events = super()._receive_goaway_frame(frame)
        self.state_machine.state = state
        self._data_to_send += queued
        return frames, events
