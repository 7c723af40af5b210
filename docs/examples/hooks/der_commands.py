from der_sdk import hookimpl
from der_sdk.extensions import CommandType


def add_arguments(parser):
    parser.add_argument("site_id", metavar="SITE_ID", help="the site to report on")
    parser.add_argument("--days", type=int, default=7, help="how far back to look")


def run(args):
    # import what the command needs here, not at the top: `der --help` loads every plugin
    print(f"energy report for site {args.site_id} over {args.days} days")
    return 0  # the exit status of `der energy-report`


@hookimpl
def der_commands():
    return [
        CommandType(
            name="energy-report",
            help="print a site's energy report",
            description="Print the energy each asset of a site charged and discharged.",
            add_arguments=add_arguments,
            run=run,
        )
    ]
