import test from 'ava';

import { RateLimiter } from '../../../daemons/rng/rate-limiter';

function clock(start = 0) {
  const c = { now: start, read: () => c.now };
  return c;
}

test('without a limit every request is granted in full', (t) => {
  const limiter = new RateLimiter(undefined);
  t.is(limiter.take(1 << 20), 1 << 20);
  t.is(limiter.msUntilRefill(), 0);
});

test('a period grants at most maxBytes, then nothing until the next period', (t) => {
  const c = clock();
  const limiter = new RateLimiter({ maxBytes: 100, periodMs: 1000 }, c.read);
  t.is(limiter.take(60), 60);
  t.is(limiter.take(60), 40, 'the rest of the quota, not more');
  t.is(limiter.take(1), 0);
  c.now = 400;
  t.is(limiter.msUntilRefill(), 600);
  c.now = 1000;
  t.is(limiter.available(), 100, 'quota refilled at the period boundary');
});

test('refills align to period boundaries, so idle time does not bank quota', (t) => {
  const c = clock();
  const limiter = new RateLimiter({ maxBytes: 10, periodMs: 100 }, c.read);
  c.now = 1050;
  t.is(limiter.take(50), 10);
  c.now = 1099;
  t.is(limiter.take(1), 0);
  t.is(limiter.msUntilRefill(), 1);
  c.now = 1100;
  t.is(limiter.take(50), 10);
});
