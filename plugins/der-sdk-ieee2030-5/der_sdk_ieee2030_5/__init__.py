"""der-sdk-ieee2030-5: an IEEE 2030.5 / CSIP aggregator client for der-sdk
(``docs/programs.md``, "IEEE 2030.5")."""
