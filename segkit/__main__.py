"""`python -m segkit ...` runs the `segkit` command (what `torchrun --nproc-per-node N -m segkit train ...`
starts in every process)."""

from segkit.cli import main

if __name__ == "__main__":
    main(prog_name="segkit")
