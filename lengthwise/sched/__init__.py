"""Scheduling: the step scheduler (token budget, blocks, preemption) and the policies that order it.
Pure Python: no torch, testable with fake clocks."""

from lengthwise.sched.policy import FCFSPolicy, SchedulerView, SchedulingPolicy, make_policy
from lengthwise.sched.scheduler import ScheduledChunk, Scheduler, SchedulerOutput

__all__ = ["FCFSPolicy", "ScheduledChunk", "Scheduler", "SchedulerOutput", "SchedulerView", "SchedulingPolicy",
           "make_policy"]
