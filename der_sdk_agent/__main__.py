"""``python -m der_sdk_agent``: run one agent configured by environment variables.

The same as ``der agent`` without command-line options; see ``docs/agent.md``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from der_sdk.errors import DerSdkError
from der_sdk_agent.launch import run_agent
from der_sdk_agent.settings import AgentSettings


def main() -> int:
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(run_agent(AgentSettings.from_env(os.environ)))
    except DerSdkError as exc:
        logging.getLogger("der.agent").error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
