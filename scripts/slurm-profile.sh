#!/usr/bin/env bash
# Make the bare name `slurm` find this project's profile: `snakemake --profile slurm` looks a
# bare name up only in ./slurm, ~/.config/snakemake/ (or $XDG_CONFIG_HOME/snakemake/) and
# /etc/xdg/snakemake/, never in ./profiles/. This links $XDG_CONFIG_HOME/snakemake/slurm to
# profiles/slurm of this checkout (replacing an older link; an existing real folder is left alone).
#   scripts/slurm-profile.sh && snakemake --profile slurm all_tables --configfile config/paper.yaml
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)/profiles/slurm"
dest_dir="${XDG_CONFIG_HOME:-$HOME/.config}/snakemake"
dest="$dest_dir/slurm"
if [ -e "$dest" ] && [ ! -L "$dest" ]; then
    echo "slurm-profile: $dest exists and is not a link; move it away or use --profile $src" >&2
    exit 1
fi
mkdir -p "$dest_dir"
ln -sfn "$src" "$dest"
echo "slurm-profile: $dest -> $src"
