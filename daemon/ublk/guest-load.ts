/**
 * How busy the guest keeps one queue, in requests (QueueLoop.load): what a queue target reads
 * to let background work (copy-on-read) yield to a busy guest. Counted per loop turn (one
 * io_uring_enter's completions), with one clock read per turn, never per request.
 */

/** A wait in io_uring_enter longer than this (ms) ends the guest's last burst. */
export const LOAD_IDLE_MS = 10;

export class GuestLoad {
  /** Requests received and not yet completed. */
  inFlight = 0;
  private turnRequests = 0;
  private lastTurnRequests = 0;
  private turnStart: number;

  constructor(now: number) {
    this.turnStart = now;
  }

  /** A request arrived in this turn. */
  arrived(): void {
    this.inFlight++;
    this.turnRequests++;
  }

  /** A request was completed. */
  completed(): void {
    this.inFlight--;
  }

  /**
   * A new loop turn begins at `now` (after the wait in io_uring_enter). The previous turn's
   * requests tell how busy the guest keeps the queue only if that turn was recent: after a wait
   * longer than LOAD_IDLE_MS the guest's last burst is over (without this, the first request
   * after an idle gap counted the burst before it — a QD1 read right after a QD16 job looked busy).
   */
  newTurn(now: number): void {
    this.lastTurnRequests = now - this.turnStart > LOAD_IDLE_MS ? 0 : this.turnRequests;
    this.turnStart = now;
    this.turnRequests = 0;
  }

  /**
   * The most of: requests in flight (the one being handled included), those that arrived in this
   * turn and those of the previous turn. A request served synchronously completes before the next
   * arrives, so in-flight alone reads 1 at any depth; a guest at depth 1 sends one request per
   * turn, a deeper one several.
   */
  get load(): number {
    return Math.max(this.inFlight, this.turnRequests, this.lastTurnRequests);
  }

  /** When this turn began (the clock read once per io_uring_enter). */
  get turnTime(): number {
    return this.turnStart;
  }
}
