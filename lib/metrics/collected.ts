/**
 * Counters read at scrape time. The datapath keeps plain cumulative numbers (`+= n` once per batch,
 * no prom-client call on the hot path); a collected counter copies them into Prometheus when
 * /metrics is scraped. The numbers must never decrease (they are counters).
 */
import { Counter, type LabelValues, type Registry } from 'prom-client';

/** One sample: its labels and the cumulative value. */
export type Sample<L extends string> = readonly [LabelValues<L>, number];

/** A counter whose samples `read` returns at every scrape. */
export function collectedCounter<L extends string>(
  registry: Registry,
  name: string,
  help: string,
  labelNames: readonly L[],
  read: () => Iterable<Sample<L>>,
): Counter<L> {
  return new Counter<L>({
    name,
    help,
    labelNames,
    registers: [registry],
    collect() {
      this.reset();
      for (const [labels, value] of read()) this.inc(labels, value);
    },
  });
}

/** A counter with one sample per queue (label `queue`), `read(queue)` giving its value. */
export function queueCounter(registry: Registry, name: string, help: string, queues: () => number, read: (queue: number) => number): Counter<'queue'> {
  return collectedCounter(registry, name, help, ['queue'], function* () {
    for (let q = 0; q < queues(); q++) yield [{ queue: String(q) }, read(q)];
  });
}

/**
 * A counter with one sample per queue and per name of `names` (labels `queue` and `label`): `read(queue)`
 * gives the queue's counts in the order of `names`, or null for a queue that has none (e.g. net's rx
 * queues for tx drops). `omitZero` leaves out the samples still at 0 (scsi: dozens of classes per queue).
 */
export function queueCountsCounter<L extends string>(
  registry: Registry,
  name: string,
  help: string,
  label: L,
  names: readonly string[],
  queues: () => number,
  read: (queue: number) => ArrayLike<number> | null,
  omitZero = false,
): Counter<'queue' | L> {
  return collectedCounter<'queue' | L>(registry, name, help, ['queue', label], function* () {
    for (let q = 0; q < queues(); q++) {
      const counts = read(q);
      if (counts === null) continue;
      for (let i = 0; i < names.length; i++) {
        if (omitZero && counts[i] === 0) continue;
        yield [{ queue: String(q), [label]: names[i]! } as Record<'queue' | L, string>, counts[i]!];
      }
    }
  });
}

/** A counter without labels. */
export function valueCounter(registry: Registry, name: string, help: string, read: () => number): Counter<never> {
  return collectedCounter<never>(registry, name, help, [], () => [[{}, read()]]);
}
