/**
 * Writes that the hot path only records in memory (last use, usage counts) and that are flushed on a
 * timer and at shutdown. Flushes never overlap: each starts after the one before it has finished.
 */
export class PeriodicFlush {
  private timer: NodeJS.Timeout | undefined;
  private chain: Promise<void> = Promise.resolve();

  constructor(private readonly flushOnce: () => Promise<void>) {}

  /** The timer never keeps the process alive on its own. */
  start(intervalMs: number): void {
    if (this.timer) return;
    this.timer = setInterval(() => void this.run(), intervalMs);
    this.timer.unref();
  }

  /** Stops the timer and writes what is pending (before the database closes). */
  async stop(): Promise<void> {
    clearInterval(this.timer);
    this.timer = undefined;
    await this.run();
  }

  run(): Promise<void> {
    this.chain = this.chain.then(this.flushOnce);
    return this.chain;
  }
}
