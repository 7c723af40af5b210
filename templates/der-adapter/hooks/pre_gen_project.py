"""Refuse a plugin name the generated distribution could not use (also checked by
``der new-adapter``, repeated here for people who run cookiecutter on the template)."""

import re
import sys

NAME = "{{ cookiecutter.name }}"

if not re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", NAME) or NAME.startswith("der-sdk-"):
    sys.exit(
        f"invalid plugin name {NAME!r}: use lowercase letters, digits and single hyphens, "
        "starting with a letter, without the der-sdk- prefix (it is added for you)"
    )
