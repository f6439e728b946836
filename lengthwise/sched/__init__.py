"""Scheduling: the step scheduler (token budget, blocks, preemption, failure collection) and the
policies that order it, selected by name with `make_policy`. Pure Python: no torch, testable
with fake clocks."""

from lengthwise.sched.batching import BatchPolicy, MultiBinPolicy, SequencePolicy, StaticPolicy
from lengthwise.sched.continuous import ShortestJobFirstPolicy
from lengthwise.sched.policy import FCFSPolicy, PriorityPolicy, SchedulerView, SchedulingPolicy, make_policy
from lengthwise.sched.scheduler import ScheduledChunk, Scheduler, SchedulerOutput

__all__ = ["BatchPolicy", "FCFSPolicy", "MultiBinPolicy", "PriorityPolicy", "ScheduledChunk", "Scheduler",
           "SchedulerOutput", "SchedulerView", "SchedulingPolicy", "SequencePolicy", "ShortestJobFirstPolicy",
           "StaticPolicy", "make_policy"]
