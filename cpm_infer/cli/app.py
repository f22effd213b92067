"""The ``cpm`` entry point: command registration and the one place errors become messages."""

from __future__ import annotations

import errno
import logging
import os
import sys

import typer

from cpm_infer.cli import batch, bench, demo, export, generate, info, model, serve, tokenize
from cpm_infer.cli import eval as eval_cli
from cpm_infer.cli import tokenizer as tokenizer_cli
from cpm_infer.cli import train as train_cli
from cpm_infer.errors import CpmError, Interrupted, describe

app = typer.Typer(
    name="cpm",
    help="Fast CPM (Chinese GPT-2) generation: export, serve, benchmark, fine-tune.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("generate")(generate.generate)
app.command("batch")(batch.batch)
app.command("info")(info.info)
app.command("tokenize")(tokenize.tokenize)
app.command("serve")(serve.serve)
app.add_typer(model.app, name="model")
app.add_typer(train_cli.app, name="train")
app.add_typer(tokenizer_cli.app, name="tokenizer")
app.add_typer(export.app, name="export")
app.command("bench")(bench.bench)
app.command("demo")(demo.demo)
app.add_typer(eval_cli.app, name="eval")


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details to stderr.")) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def main() -> None:
    from cpm_infer.ort_pool import allow_shared_pool

    allow_shared_pool()  # this process is ours: a model and its draft may share one onnxruntime thread pool
    debug = bool(os.environ.get("CPM_DEBUG"))
    try:
        app()
    except Interrupted as exc:
        _fail(str(exc), 130)
    except CpmError as exc:
        if debug:
            raise
        _fail(str(exc), 1)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as exc:
        if debug:
            raise
        if isinstance(exc, OSError) and exc.errno in _DISK_ERRORS:
            # A full or read-only disk is the user's to fix, not a bug (the atomic writers left nothing behind).
            target = exc.filename2 or exc.filename  # shutil names the destination second
            _fail(f"{exc.strerror}" + (f": {target}" if target else ""), 1)
        _fail(f"unexpected {describe(exc)} (set CPM_DEBUG=1 for the traceback)", 1)


_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def _fail(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
