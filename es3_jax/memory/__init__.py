"""The tracker's memory, one module per part: what a tracked frame becomes (`encoder`), where it is
kept (`bank`, fixed slots per object), which kept entries each step reads and where it writes
(`schedule`, host-side), and how the current frame reads them (`path`: the teacher's raw frames and
memory attention, or the student's `perceiver` compression and fewer, pooled `attention` layers)."""
