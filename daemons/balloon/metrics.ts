/**
 * The balloon daemon's own Prometheus metrics (`vhostd_balloon_*`, listed in daemons/balloon/README.md).
 * The device only adds to the plain numbers of {@link BalloonStats} and keeps its state; the metrics
 * read both at scrape time.
 */
import { Gauge, type Registry } from 'prom-client';

import { collectedCounter, valueCounter } from '../../lib/metrics/collected';
import { BAD_PFN_REASONS, noBadPfns } from './inflate-deflate';
import { STAT_TAGS } from './stats';

/** The device's counters: plain numbers, cumulative for the life of the device. */
export class BalloonStats {
  /** 4 KiB pages the guest put in the balloon (inflate), and took out (deflate). */
  inflatedPages = 0;
  deflatedPages = 0;
  /** Bytes given back to the host, by inflate and by free page reporting. */
  releasedInflateBytes = 0;
  releasedReportingBytes = 0;
  /** Bytes the guest reported free (reporting buffers' lengths). */
  reportedBytes = 0;
  /** Skipped PFNs by reason (inflate-deflate.ts). */
  readonly badPfns = noBadPfns();
  /** Ranges whose release failed (fallocate and madvise both refused). */
  releaseErrors = 0;
  /** Stats buffers received from the driver. */
  statsUpdates = 0;
}

/** What the gauges read from the device at scrape time. */
export interface BalloonState {
  readonly targetPages: number;
  readonly actualPages: number;
  readonly balloonPages: number;
  readonly partialHugePages: number;
  readonly unreleasedPages: number;
  readonly guestStats: Readonly<Record<string, number>>;
}

function gauge(registry: Registry, name: string, help: string, read: () => number): Gauge<never> {
  return new Gauge<never>({
    name,
    help,
    registers: [registry],
    collect() {
      this.set(read());
    },
  });
}

/**
 * Register the `vhostd_balloon_*` metrics reading `stats` and `state` in `registry`. The guest's
 * statistics (`vhostd_balloon_guest_*`) appear once the guest sent them, through `addGuestStats`
 * (a gauge without a sample would read 0, which for free memory says something false).
 */
export function createBalloonMetrics(registry: Registry, stats: BalloonStats, state: BalloonState) {
  const counter = (name: string, help: string, read: () => number) => valueCounter(registry, name, help, read);
  const guest = new Map<string, Gauge<never>>();
  return {
    targetPages: gauge(registry, 'vhostd_balloon_target_pages', 'Balloon size asked of the guest (num_pages), in 4 KiB pages', () => state.targetPages),
    actualPages: gauge(registry, 'vhostd_balloon_actual_pages', 'Balloon size the guest reports (actual), in 4 KiB pages', () => state.actualPages),
    balloonPages: gauge(registry, 'vhostd_balloon_pages', 'Pages in the balloon by the device\'s count (inflated minus deflated)', () => state.balloonPages),
    partialHugePages: gauge(
      registry,
      'vhostd_balloon_partial_huge_pages',
      'Huge pages (hugetlbfs) with some but not all of their 4 KiB pages in the balloon: not released yet',
      () => state.partialHugePages,
    ),
    unreleasedPages: gauge(
      registry,
      'vhostd_balloon_unreleased_pages',
      '4 KiB pages in the balloon whose memory the host still holds: their huge page is not wholly in the balloon',
      () => state.unreleasedPages,
    ),
    inflatedPages: counter('vhostd_balloon_inflated_pages_total', '4 KiB pages the guest put in the balloon', () => stats.inflatedPages),
    deflatedPages: counter('vhostd_balloon_deflated_pages_total', '4 KiB pages the guest took out of the balloon', () => stats.deflatedPages),
    releasedBytes: collectedCounter(registry, 'vhostd_balloon_released_bytes_total', 'Bytes of guest memory given back to the host', ['source'], () => [
      [{ source: 'inflate' }, stats.releasedInflateBytes],
      [{ source: 'reporting' }, stats.releasedReportingBytes],
    ]),
    reportedBytes: counter('vhostd_balloon_reported_bytes_total', 'Bytes the guest reported free (free page reporting)', () => stats.reportedBytes),
    badPfns: collectedCounter(
      registry,
      'vhostd_balloon_bad_pfns_total',
      'PFNs skipped: outside guest memory, repeated, deflated without being inflated, misaligned buffer bytes, past the per-buffer limit',
      ['reason'],
      () => BAD_PFN_REASONS.map((reason) => [{ reason }, stats.badPfns[reason]] as const),
    ),
    releaseErrors: counter('vhostd_balloon_release_errors_total', 'Ranges the host refused to release (fallocate and madvise failed)', () => stats.releaseErrors),
    statsUpdates: counter('vhostd_balloon_stats_updates_total', 'Statistics buffers received from the guest', () => stats.statsUpdates),
    /** Register the gauges of the statistics in `names` (STAT_TAGS names) not registered yet. */
    addGuestStats(names: Iterable<string>): void {
      for (const name of names) {
        const tag = STAT_TAGS.find((t) => t.name === name);
        if (tag === undefined || guest.has(name)) continue;
        guest.set(name, gauge(registry, `vhostd_balloon_guest_${name}`, `Guest statistic: ${tag.help}`, () => state.guestStats[name] ?? 0));
      }
    },
  };
}

export type BalloonMetrics = ReturnType<typeof createBalloonMetrics>;
