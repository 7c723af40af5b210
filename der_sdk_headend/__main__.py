"""``python -m der_sdk_headend``: run the headend configured by the environment."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from der_sdk.errors import DerSdkError
from der_sdk_headend.config import HeadendConfig
from der_sdk_headend.service import run_headend


def main() -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(run_headend(HeadendConfig.from_env(os.environ)))
    except DerSdkError as exc:
        logging.getLogger("der.headend").error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
