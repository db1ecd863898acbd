"""Named crash points for the fault tests: ``SONA_FAILPOINT=name`` kills the process
(SIGKILL, as a power cut or the OOM killer would) when it reaches ``failpoint(name)``.

Points: ``feedback.stored`` (record committed, instant update not applied, no answer
sent), ``learner.trained`` (mid-cycle: trained, not gated or published),
``publish.renamed`` (version directory complete, CURRENT not moved), ``swap.loaded``
(engine serves the new version, CURRENT not moved), ``engine.save.swapped`` (old engine
copy moved aside, new one not yet renamed in), ``rollback.served`` (rolled-to version
served, learner not yet rebuilt). Unset, each call is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal


def failpoint(name: str) -> None:
    if os.environ.get("SONA_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
