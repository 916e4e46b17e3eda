"""`memagent`: one command for every entry point.

    memagent demo      [--workdir runs/tiny_synthetic] [--config.x=y ...]   the main job (CPU, nothing downloaded)
    memagent train     --config configs/grpo.py --workdir runs/x [--config.x=y ...]
    memagent evaluate  --config configs/evaluate.py --workdir runs/eval --config.models=... --config.eval_files=...
    memagent answer    --model DIR --question "..." --document book.txt
    memagent generate  --model DIR --prompt "..."
    memagent serve     --model DIR [--host 127.0.0.1] [--port 8000] [--batch-size 8]
    memagent plan      --config configs/qwen2_5_7b_hotpotqa.py:v5p-128
    memagent build-data hotpotqa|squad RAW.json --out_dir DIR ...

Each subcommand is the module of the same name (`python -m memagent_jax.train`, ...; `build-data hotpotqa` is
`python -m memagent_jax.data.hotpotqa`), which still works on its own. `memagent <command> --help` describes a
command; the config-driven ones (demo, train, evaluate, plan) also take `--print-config`, which prints every
config field with its value after the overrides given and its one-line description.

A user error (a bad flag, config field, file or row) is one line, `error: ...`, and exit status 2; `--debug`
(anywhere on the command line) or MEMAGENT_DEBUG=1 shows its traceback instead.
"""

from __future__ import annotations

import importlib
import io
import os
import re
import sys
import tokenize
from collections.abc import Sequence

from memagent_jax import errors

# name -> (module, kind, default config file, one line)
COMMANDS = {
    "demo": (
        "memagent_jax.pipeline",
        "absl",
        "tiny_synthetic.py",
        "the main job: task, tokenizer, tiny model, warm start, GRPO, evaluation, report (CPU)",
    ),
    "train": ("memagent_jax.train", "absl", "grpo.py", "train a memory agent with multi-conversation GRPO"),
    "evaluate": ("memagent_jax.evaluate", "absl", "evaluate.py", "accuracy per document length, with intervals"),
    "answer": ("memagent_jax.answer", "argparse", None, "answer questions about long documents"),
    "generate": ("memagent_jax.generate", "argparse", None, "plain completion from a model folder"),
    "serve": ("memagent_jax.serve", "argparse", None, "OpenAI-compatible HTTP server with continuous batching"),
    "plan": ("memagent_jax.plan", "plan", None, "memory / FLOPs / step-time planner for a training config"),
    "build-data": (None, "build", None, "build training / evaluation files from raw HotpotQA or SQuAD json"),
}
BUILDERS = {"hotpotqa": "memagent_jax.data.hotpotqa", "squad": "memagent_jax.data.squad"}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {line}" for name, (_, _, _, line) in COMMANDS.items()]
    return (
        "usage: memagent <command> [args]   (memagent <command> --help for its flags)\n\ncommands:\n"
        + "\n".join(lines)
        + "\n"
    )


def _default_config(name: str) -> str:
    """configs/<name> relative to the working directory when there (a checkout, or the user's own), else the
    shipped recipe."""
    from memagent_jax import configs

    local = os.path.join("configs", name)
    return local if os.path.isfile(local) else configs.path_of(name)


def _config_arg(argv: Sequence[str]) -> str | None:
    from memagent_jax.plan import config_arg  # plan imports no JAX: the command stays light

    return config_arg(argv)


# ----------------------------------------------------------------------------------------- config fields


def config_docs(path: str) -> dict[str, str]:
    """{dotted field: one-line description} from the comments of a config file (a trailing `# ...` on the field's
    line, else the comment block just above it), plus those of the config files in the same folder that it
    loads (e.g. the recipe configs build on grpo.py)."""
    docs: dict[str, str] = {}
    try:
        source = open(path, encoding="utf-8").read()
    except OSError:
        return docs
    folder = os.path.dirname(path)
    for other in sorted(set(re.findall(r"\b(\w+)\.py\b", source))):
        other_path = os.path.join(folder, other + ".py")
        if other_path != path and os.path.isfile(other_path):
            for key, value in config_docs_of_source(open(other_path, encoding="utf-8").read()).items():
                docs.setdefault(key, value)
    docs.update(config_docs_of_source(source))
    return docs


def config_docs_of_source(source: str) -> dict[str, str]:
    comments: dict[int, str] = {}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return {}
    docs: dict[str, str] = {}
    section, block = None, []
    for number, line in enumerate(source.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("#"):
            block.append(comments.get(number, ""))
            continue
        opened = re.match(r"\s*c\.([\w.]+)\s*=\s*ml_collections\.ConfigDict\(", line)
        plain = re.match(r"\s*c\.([\w.]+)\s*=", line)
        field = re.match(r"\s+(\w+)\s*=(?!=)", line) if section else None
        key = None
        if opened:
            section, key = opened.group(1), opened.group(1)
        elif plain:
            key = plain.group(1)
            if not key.startswith(f"{section}."):
                section = None
        elif field and line.startswith(" " * 8):
            key = f"{section}.{field.group(1)}"
        if key:
            doc = comments.get(number) or " ".join(b for b in block if b)
            if doc:
                docs.setdefault(key, doc.split(". ")[0].rstrip(".") if not comments.get(number) else doc)
        if stripped.startswith("))"):
            section = None
        block = []
    return docs


def format_config(cfg, docs: dict[str, str] | None = None, prefix: str = "") -> str:
    """One line per leaf field: `name = value  # description`."""
    docs = docs or {}
    lines = []
    for name in cfg.keys():
        value = cfg[name]
        key = f"{prefix}{name}"
        if hasattr(value, "keys") and hasattr(value, "to_dict"):
            lines.append(format_config(value, docs, prefix=f"{key}."))
            continue
        doc = docs.get(key, "")
        lines.append(f"{key} = {value!r}" + (f"  # {doc}" if doc else ""))
    return "\n".join(line for line in lines if line)


def print_config(argv: Sequence[str], default_config: str | None) -> int:
    """Loads --config (and its --config.x=y overrides) as the command would and prints every field."""
    from absl import flags
    from ml_collections import config_flags

    from memagent_jax import configs

    path = _config_arg(argv) or (default_config and _default_config(default_config))
    if path:
        path = configs.resolve(path)
    if not path:
        print("error: --print-config needs --config FILE", file=sys.stderr)
        return 2
    overrides = [a for a in argv if a.startswith("--config.")]
    args = [f"--config={path}"] + overrides
    errors.check_config_overrides(args)  # a typo in --config.a.b: one line naming the flag and the file
    fv = flags.FlagValues()
    flag = config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv, sys_argv=["x"] + args)
    try:
        fv(["x"] + args)
    except (flags.Error, ValueError, OSError) as e:
        return errors.handle(errors.UserError(errors.flag_error_message(e)))
    file_path = path.split(":", 1)[0]
    print(f"# {path}: every field (value after overrides)  # description")
    print(format_config(flag.value, config_docs(file_path)))
    return 0


# ----------------------------------------------------------------------------------------- dispatch


def _help(name: str, module: str, kind: str, default_config: str | None) -> int:
    mod = importlib.import_module(module)
    print(f"usage: memagent {name} [flags]   (= python -m {module})\n")
    print((mod.__doc__ or "").strip())
    if kind == "absl":
        print(
            f"\nflags:\n  --config FILE[:ARG]  config file (default: configs/{default_config}); every field can be "
            f"set with --config.<field>=<value>\n  --workdir DIR        where everything is written"
            + (" (default: runs/tiny_synthetic)" if name == "demo" else "")
            + "\n  --print-config       print every config field with its value and description, then stop"
        )
        if name in ("train", "evaluate"):
            print(
                "  --coordinator_address / --num_processes / --process_id   multi-host runs "
                "(see memagent_jax.distributed)"
            )
    return 0


def _run_absl(name: str, module: str, default_config: str, argv: list[str]) -> int:
    mod = importlib.import_module(module)
    if _config_arg(argv) is None:
        argv = ["--config", _default_config(default_config)] + argv
    if name == "demo" and not any(a == "--workdir" or a.startswith("--workdir=") for a in argv):
        argv = argv + ["--workdir", "runs/tiny_synthetic"]
    try:  # --config.* checked first, flag errors and user errors as one line, exit status 2
        errors.run_absl(mod.main, mod.define_flags, default_config=default_config, argv=[f"memagent {name}"] + argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


@errors.user_errors  # --debug (or MEMAGENT_DEBUG=1), anywhere: the traceback of a user error instead of its line
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage() + "\n" + __doc__.strip().split("\n\n", 2)[-1])
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, kind, default_config, _ = COMMANDS[name]
    if kind == "build":
        if not rest or rest[0] in ("-h", "--help"):
            print(
                "usage: memagent build-data {hotpotqa,squad} [args]   (--help after the source for its flags)\n"
                "  hotpotqa   python -m memagent_jax.data.hotpotqa: RULER-HotpotQA-style evaluation suite and "
                "training file\n  squad      python -m memagent_jax.data.squad: the RULER qa_1 (SQuAD) suite"
            )
            return 0 if rest else 2
        if rest[0] not in BUILDERS:
            print(f"error: build-data: unknown source {rest[0]!r}; one of {', '.join(BUILDERS)}", file=sys.stderr)
            return 2
        return importlib.import_module(BUILDERS[rest[0]]).main(rest[1:])
    if "--print-config" in rest:
        if kind not in ("absl", "plan"):
            print(f"error: memagent {name} has no config (see memagent {name} --help)", file=sys.stderr)
            return 2
        return print_config(rest, default_config)
    if kind == "argparse":
        return importlib.import_module(module).main(rest)
    if kind == "plan":
        return importlib.import_module(module).main([f"memagent {name}"] + rest)
    if any(a in ("-h", "--help", "--helpshort") for a in rest):
        return _help(name, module, kind, default_config)
    return _run_absl(name, module, default_config, rest)


if __name__ == "__main__":
    sys.exit(main())
