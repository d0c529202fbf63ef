-- holder.lua: the worker that holds a job (claimed, handed to it, running), for status reads.
--
-- KEYS[1]  the leases ({ns}:leases): the workers that may hold jobs
-- ARGV[1]  key base, e.g. "{jobq}"
-- ARGV[2]  job id
--
-- Returns the worker's id, or false when no worker holds it.
return holder(ARGV[1], ARGV[2])
