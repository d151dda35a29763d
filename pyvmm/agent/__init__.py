"""The guest agent, host side: run commands in a guest and move files, over vsock.

``pyvmm-agent`` (``guest/progs/pyvmm-agent.c``) runs in the guest when the kernel cmdline has
``pyvmm.agent=1`` (port :data:`~pyvmm.agent.wire.AGENT_PORT`) or ``pyvmm.agent=PORT``.  This
package owns the host's end: the protocol (:mod:`pyvmm.agent.wire`, sans-I/O) and the client
(:mod:`pyvmm.agent.client`)::

    with Agent.connect_uds("/tmp/v.sock") as agent:      # pyvmm run --vsock 3,uds=/tmp/v.sock
        r = agent.run("uname -r")                        # r.ok, r.status, r.stdout, r.stderr
        agent.put("/tmp/x", b"data", mode=0o600)
        agent.get("/proc/cpuinfo")
"""

from .client import (IO_TIMEOUT, RESULT_GRACE, Agent, AgentBusy, AgentError, AgentProtocolError,
                     AgentTimeout, Result, connect_uds)
from .wire import AGENT_PORT

__all__ = ["AGENT_PORT", "IO_TIMEOUT", "RESULT_GRACE", "Agent", "AgentBusy", "AgentError",
           "AgentProtocolError", "AgentTimeout", "Result", "connect_uds"]
