/**
 * Read Prometheus text exposition (what GET /metrics answers) the way a user looks at it: one sample
 * by metric name and labels.
 */
import type { Registry } from 'prom-client';

export interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

/** One metric of prom-client's `getMetricsAsJSON()`; histogram samples carry their own `metricName`. */
export interface MetricJson {
  name: string;
  values: { labels: Record<string, string | number>; value: number; metricName?: string }[];
}

/** Every sample line of `text` (comments skipped). */
export function parseSamples(text: string): Sample[] {
  const out: Sample[] = [];
  for (const line of text.split('\n')) {
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (m === null) continue;
    const labels: Record<string, string> = {};
    for (const l of (m[2] ?? '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]!] = l[2]!;
    out.push({ name: m[1]!, labels, value: Number(m[3]) });
  }
  return out;
}

/** A scrape of `registry`, queried by name and (a subset of) labels. */
export class Scrape {
  readonly samples: Sample[];

  private constructor(readonly text: string) {
    this.samples = parseSamples(text);
  }

  static async of(registry: Registry): Promise<Scrape> {
    return new Scrape(await registry.metrics());
  }

  /** A scrape already fetched, e.g. the body of GET /metrics. */
  static fromText(text: string): Scrape {
    return new Scrape(text);
  }

  /**
   * A scrape from prom-client's `getMetricsAsJSON()`, which the control method `metrics` answers (for a
   * daemon whose HTTP port is out of reach, in a network namespace say).
   */
  static fromJson(metrics: readonly MetricJson[]): Scrape {
    const escape = (v: string | number) => String(v).replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\n');
    const lines = metrics.flatMap((m) =>
      m.values.map((v) => {
        const labels = Object.entries(v.labels).map(([k, l]) => `${k}="${escape(l)}"`);
        return `${v.metricName ?? m.name}${labels.length > 0 ? `{${labels.join(',')}}` : ''} ${v.value}`;
      }),
    );
    return new Scrape(lines.join('\n'));
  }

  /** The value of the one sample of `name` carrying `labels`; undefined when there is none. Throws if several match. */
  value(name: string, labels: Record<string, string> = {}): number | undefined {
    const hits = this.samples.filter((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v));
    if (hits.length > 1) throw new Error(`${hits.length} samples of ${name} match ${JSON.stringify(labels)}`);
    return hits[0]?.value;
  }

  /** The sum over every sample of `name` carrying `labels` (0 when there is none). */
  sum(name: string, labels: Record<string, string> = {}): number {
    return this.samples.filter((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v)).reduce((n, s) => n + s.value, 0);
  }
}
