"""The run record (`metrics.json`: schema, statuses), finding run directories, override parsing, a job's
lifecycle and the end-of-sweep summary. Depends on nothing of segx above `segx.core`."""
