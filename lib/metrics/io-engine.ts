/**
 * The counters of a device's I/O engines (lib/io/engine.ts IoEngineStats), one sample per queue: how
 * many reads and writes ran inline, how many inline tries fell back, how many ops went to the
 * executor. Every device that serves files registers them under its own prefix (`vhostd_blk_*`,
 * `vhostd_scsi_*`), so a device's I/O reads next to its other metrics with the same `queue` label.
 */
import type { Registry } from 'prom-client';

import type { IoEngineStats } from '../io/engine';
import { queueCounter } from './collected';

const INLINE_OPS_HELP = 'Reads and writes done on the queue thread (file on tmpfs/ramfs/hugetlbfs, or a read that hit the page cache)';
const INLINE_FALLBACKS_HELP = 'Reads tried on the queue thread with RWF_NOWAIT that went to io_uring (page-cache miss or partial hit)';
const EXECUTOR_OPS_HELP = 'I/O ops handed to io_uring (or the thread-pool fallback), resubmitted rests included';

/**
 * Register `<prefix>_inline_ops_total`, `<prefix>_inline_fallbacks_total` and
 * `<prefix>_executor_ops_total`; `stats(q)` gives the engine counters of queue `q` of `queues()`.
 */
export function ioEngineCounters(registry: Registry, prefix: string, queues: () => number, stats: (queue: number) => IoEngineStats) {
  return {
    inlineOps: queueCounter(registry, `${prefix}_inline_ops_total`, INLINE_OPS_HELP, queues, (q) => stats(q).inline),
    inlineFallbacks: queueCounter(registry, `${prefix}_inline_fallbacks_total`, INLINE_FALLBACKS_HELP, queues, (q) => stats(q).inlineFallbacks),
    executorOps: queueCounter(registry, `${prefix}_executor_ops_total`, EXECUTOR_OPS_HELP, queues, (q) => stats(q).executor),
  };
}
