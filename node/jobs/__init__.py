"""Training jobs: the coordinator of jobs submitted here (rounds, task assignment, checks,
merging, publication), the worker that runs other nodes' micro-tasks, the contribution
receipts and their feed, and the child processes that do the torch work (taskrun runs
taskproc in children forked from a warm parent that imported torch once, warmchild, or
fresh ``python -m node.jobs.taskproc`` processes; the daemon itself never imports torch).

Owns: the task stream, the job topic, the work directory. May import: node.p2p,
node.discovery, node.smip, node.chain, node.storage, node.config, node.drive, protocol/; node.ml
only from taskproc (the child process; warmchild names it for the warm parent to import).
"""
