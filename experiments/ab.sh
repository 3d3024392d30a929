# Sourced by the records' run.sh scripts (with $out and $py set): a Hydra sweep run once per side, the old tree
# (HEAD_TREE, a `git archive` of an earlier commit) then this one, each into $out/runs/NAME_SIDE.
root_of() { case $1 in old) echo "${HEAD_TREE:?HEAD_TREE=dir of the tree at the session start}";; *) echo "$PWD";; esac; }
ab() {  # ab NAME TIMEOUT ARGS...: the sweep once per side, old then new, into $out/runs/NAME_SIDE
  name=$1; limit=$2; shift 2
  for side in old new; do
    root=$(root_of $side)
    (cd "$root" && PYTHONPATH=$root:${PYTHONPATH:-} timeout $limit $py -m harness -m "$@" report=false \
        hydra.sweep.dir="$out/runs/${name}_$side" 2>&1 | grep -v WARNING | tail -1)
  done
}
