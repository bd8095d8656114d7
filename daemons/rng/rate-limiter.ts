/**
 * QEMU virtio-rng's rate limit: at most `maxBytes` per `periodMs`, the quota refilled whole at the
 * start of each period. Requests beyond the quota wait for the next period; nothing is dropped.
 */
export interface RateLimit {
  maxBytes: number;
  periodMs: number;
}

export class RateLimiter {
  private quota: number;
  private periodStart: number;

  constructor(
    private readonly limit: RateLimit | undefined,
    private readonly now: () => number = () => performance.now(),
  ) {
    this.quota = limit?.maxBytes ?? Infinity;
    this.periodStart = this.now();
  }

  /** Bytes that may be handed out right now. */
  available(): number {
    this.refill();
    return this.quota;
  }

  /** Take up to `wanted` bytes of quota; returns how many were granted. */
  take(wanted: number): number {
    this.refill();
    const granted = Math.min(wanted, this.quota);
    this.quota -= granted;
    return granted;
  }

  /** Milliseconds until the quota refills (0 when unlimited or not exhausted). */
  msUntilRefill(): number {
    if (this.limit === undefined || this.available() > 0) return 0;
    return Math.max(1, this.periodStart + this.limit.periodMs - this.now());
  }

  private refill(): void {
    if (this.limit === undefined) return;
    const now = this.now();
    if (now - this.periodStart >= this.limit.periodMs) {
      // Align to period boundaries so a burst cannot straddle two fresh quotas.
      const periods = Math.floor((now - this.periodStart) / this.limit.periodMs);
      this.periodStart += periods * this.limit.periodMs;
      this.quota = this.limit.maxBytes;
    }
  }
}
