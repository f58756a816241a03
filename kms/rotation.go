package kms

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Rotation period bounds: the minimum is Config.MinRotationPeriod (kmsd
// --min-rotation-period), this by default.
const (
	DefaultMinRotationPeriod = time.Hour
	MaxRotationPeriod        = 10 * 365 * 24 * time.Hour
)

// ScheduledRotationOp is the operation of the audit record a scheduled
// rotation commits with (actor "system"; the key and the new version are
// the record's): the reason is in the name, so the record's format is
// unchanged.
const ScheduledRotationOp = "scheduled rotation: rotation_period elapsed"

// rotationScanPage is how many key headers one store read of a scan
// returns.
const rotationScanPage = 500

func (s *Service) checkRotationPeriod(d time.Duration) error {
	switch {
	case d == 0:
		return nil
	case d < 0:
		return Errorf(KindInvalid, "rotation_period must be positive (to turn scheduled rotation off, set it to null or \"\")")
	case d < s.minRotation:
		return Errorf(KindInvalid, "rotation_period %s is below this server's minimum of %s (kmsd --min-rotation-period)", FormatPeriod(d), FormatPeriod(s.minRotation))
	case d > MaxRotationPeriod:
		return Errorf(KindInvalid, "rotation_period %s is above the maximum of %s (10 years)", FormatPeriod(d), FormatPeriod(MaxRotationPeriod))
	}
	return nil
}

// FormatPeriod writes a duration the short way: 720h, 1h30m, 2s (Go's
// String writes 720h0m0s).
func FormatPeriod(d time.Duration) string {
	out := d.String()
	if strings.HasSuffix(out, "m0s") {
		out = strings.TrimSuffix(out, "0s")
	}
	if strings.HasSuffix(out, "h0m") {
		out = strings.TrimSuffix(out, "0m")
	}
	return out
}

// RotationStats is what the rotation scheduler did, for metrics. The
// counters count since this process started; the last-scan figures are
// those of the last complete scan this process ran (only the replica that
// leads "rotation" scans: on the others they stay zero).
type RotationStats struct {
	// ScheduledRotations counts the versions the scheduler committed;
	// ScheduledFailures the scheduled rotations that failed (an HSM or
	// store error; the key stays due and is tried again next round).
	ScheduledRotations uint64
	ScheduledFailures  uint64
	// OverdueKeys is how many keys were due at the last scan and still had
	// no new version when it ended (waiting for a generation slot, in a
	// background HE generation, or failed); OldestOverdue is how far past
	// its next_rotation_time the most overdue of them was.
	OverdueKeys   int
	OldestOverdue time.Duration
	// LastCompleteScan is when the last scan that read every key header
	// started; zero if none did. A scan that fails (the key listing
	// fails: the store is down, or a header does not open) leaves it and
	// the overdue figures as they were and counts in ScanFailures, so a
	// stale LastCompleteScan says the scheduler cannot see the keys.
	LastCompleteScan time.Time
	ScanFailures     uint64
}

type rotationState struct {
	scheduled, failures atomic.Uint64
	scanFailures        atomic.Uint64
	overdue             atomic.Int64
	oldest              atomic.Int64 // ns
	lastComplete        atomic.Int64 // unix ns
	heBusy              atomic.Bool  // a scheduled HE generation runs in the background
	bg                  sync.WaitGroup

	// heRetry holds the HE keys whose scheduled generation failed: each
	// is left alone until its time, so that one key that always fails
	// does not take the round's one HE attempt from the others.
	heMu    sync.Mutex
	heRetry map[string]heRetry
}

// heRetry is when a failing HE key is tried again, and how many times in a
// row it failed.
type heRetry struct {
	at    time.Time
	fails int
}

// maxHEBackoff bounds how long a failing HE key waits between scheduled
// attempts (or one check interval, if longer).
const maxHEBackoff = time.Hour

// heWaits reports whether the HE key's last scheduled generations failed
// and its next attempt is after now.
func (s *Service) heWaits(name string, now time.Time) bool {
	s.rot.heMu.Lock()
	defer s.rot.heMu.Unlock()
	r, ok := s.rot.heRetry[name]
	return ok && now.Before(r.at)
}

// heOutcome records how a scheduled HE rotation of the key ended: a
// failure puts its next attempt 2, 4, 8... check intervals later, up to
// maxHEBackoff; anything else clears it.
func (s *Service) heOutcome(name string, err error) {
	s.rot.heMu.Lock()
	defer s.rot.heMu.Unlock()
	if err == nil {
		delete(s.rot.heRetry, name)
		return
	}
	if s.rot.heRetry == nil {
		s.rot.heRetry = map[string]heRetry{}
	}
	r := s.rot.heRetry[name]
	r.fails++
	wait := max(maxHEBackoff, s.rotationEvery)
	if r.fails < 20 {
		wait = min(wait, s.rotationEvery<<r.fails)
	}
	r.at = s.clock.Now().Add(wait)
	s.rot.heRetry[name] = r
	s.log.Warn("scheduled rotation of an HE key backs off", "key", name, "failures_in_a_row", r.fails, "retry_at", r.at)
}

// heForget drops the retry times of keys a complete scan did not find due.
func (s *Service) heForget(due map[string]bool) {
	s.rot.heMu.Lock()
	defer s.rot.heMu.Unlock()
	for name := range s.rot.heRetry {
		if !due[name] {
			delete(s.rot.heRetry, name)
		}
	}
}

// RotationStats returns the scheduler's counters and the figures of its last
// scan.
func (s *Service) RotationStats() RotationStats {
	st := RotationStats{
		ScheduledRotations: s.rot.scheduled.Load(),
		ScheduledFailures:  s.rot.failures.Load(),
		OverdueKeys:        int(s.rot.overdue.Load()),
		OldestOverdue:      time.Duration(s.rot.oldest.Load()),
		ScanFailures:       s.rot.scanFailures.Load(),
	}
	if ns := s.rot.lastComplete.Load(); ns != 0 {
		st.LastCompleteScan = time.Unix(0, ns).UTC()
	}
	return st
}

// RunRotation rotates the keys that are due (RotateDue) every
// Config.RotationCheckInterval until ctx ends, then waits for the
// background HE generations it started: the work of the replica that
// leads "rotation". When it returns (the lease is lost) the overdue
// figures go back to none: they are the leader's to report, and a
// former leader's would stay as they were forever.
func (s *Service) RunRotation(ctx context.Context) {
	defer func() {
		s.rot.overdue.Store(0)
		s.rot.oldest.Store(0)
	}()
	defer s.rot.bg.Wait()
	s.every(ctx, s.rotationEvery, func(ctx context.Context) {
		if _, err := s.RotateDue(ctx); err != nil && ctx.Err() == nil {
			s.log.Error("scheduled rotation: scanning keys", "err", err)
		}
	})
}

// RotateDue is one round of scheduled rotation: it reads the key headers
// (nothing is unsealed, no version read) and rotates each key whose
// next rotation time has come, once however many periods it missed (the
// new version is made now, so the next is due a period from now). It
// returns how many versions it committed in this call. A scan that cannot
// list the keys ends there, with an error, and counts in
// RotationStats.ScanFailures.
//
// A key whose latest version is dated in the future (Key.RotationDue:
// made while the clock ran ahead) is due at once, and logged.
//
// The rotation is guarded: its transaction commits only if the key is
// still due and its latest version is still the one the scan saw, so a
// second scheduler (another replica, or a leader that lost its lease
// mid-way) adds no second version for the same due time; the loser skips.
//
// HE keys spread out so that requests keep their generation slots: at
// most one HE key per round, and none while an earlier scheduled one still
// generates in the background or when no slot is free (the key stays due
// for the next round). Keysets above the async threshold are generated in
// the background, under ctx; the others inline. An HE key whose scheduled
// rotation failed waits (heOutcome) before it is tried again, and the
// round's HE attempt goes to the next due HE key.
func (s *Service) RotateDue(ctx context.Context) (int, error) {
	now := s.clock.Now()
	rotated, overdue := 0, 0
	var oldest time.Duration
	heStarted := false
	due := map[string]bool{}
	after := ""
	for {
		batch, err := s.store.ListKeys(ctx, after, rotationScanPage)
		if err != nil {
			if ctx.Err() != nil {
				return rotated, ctx.Err()
			}
			// No key after this page is seen (the store refuses a whole
			// page when one header fails its tag): the scan is blind,
			// and says so.
			s.rot.scanFailures.Add(1)
			return rotated, asUnavailable("store", err)
		}
		for _, k := range batch {
			after = k.Name
			next, _ := k.NextRotation()
			isDue, ahead := k.RotationDue(now)
			if !isDue || IsInternal(k.Name) {
				continue
			}
			due[k.Name] = true
			if ahead {
				s.log.Warn("scheduled rotation: the key's latest version is dated in the future (the clock ran ahead when it was made, or was stepped back since); rotating it now so that its schedule runs from the clock as it is",
					"key", k.Name, "latest_created_at", k.LatestCreatedAt, "now", now)
			}
			done, err := s.rotateIfDue(ctx, k, now, &heStarted)
			if err != nil {
				if ctx.Err() != nil {
					return rotated, ctx.Err()
				}
				s.rot.failures.Add(1)
				s.log.Error("scheduled rotation failed; the key stays due", "key", k.Name, "due", next, "err", err)
			}
			if done {
				rotated++
				continue
			}
			overdue++
			if !ahead {
				oldest = max(oldest, now.Sub(next))
			}
		}
		if len(batch) < rotationScanPage {
			break
		}
	}
	s.rot.overdue.Store(int64(overdue))
	s.rot.oldest.Store(int64(oldest))
	s.rot.lastComplete.Store(now.UnixNano())
	s.heForget(due)
	return rotated, nil
}

// rotateIfDue rotates the key seen by the scan, or starts its background
// generation, or leaves it for a later round; done reports a committed
// version (or one the scan saw as due that another scheduler rotated).
func (s *Service) rotateIfDue(ctx context.Context, seen *Key, now time.Time, heStarted *bool) (done bool, err error) {
	kind, err := s.kinds.Lookup(seen.Kind)
	if err != nil {
		return false, Wrap(KindInternal, "scheduled rotation", err)
	}
	if _, he := kind.(KeysetKind); he {
		if s.heWaits(seen.Name, now) || *heStarted || s.rot.heBusy.Load() || s.generationSlotFree() != nil {
			return false, nil
		}
		*heStarted = true
		if s.asyncWanted(kind, seen.Policy) {
			s.rot.heBusy.Store(true)
			s.rot.bg.Add(1)
			go func() {
				defer s.rot.bg.Done()
				defer s.rot.heBusy.Store(false)
				_, err := s.scheduledRotate(ctx, seen, kind)
				if ctx.Err() != nil {
					return
				}
				if err != nil {
					s.rot.failures.Add(1)
					s.log.Error("scheduled rotation failed; the key stays due", "key", seen.Name, "err", err)
				}
				s.heOutcome(seen.Name, err)
			}()
			return false, nil
		}
		done, err := s.scheduledRotate(ctx, seen, kind)
		if ctx.Err() == nil {
			s.heOutcome(seen.Name, err)
		}
		return done, err
	}
	return s.scheduledRotate(ctx, seen, kind)
}

// errNotDue ends a scheduled rotation's transaction that found the key
// changed since the scan.
var errNotDue = errors.New("no longer due")

// scheduledRotate makes version seen.Latest+1 and commits it if the key is
// still due, still at seen.Latest and its policy the one it was made with
// (samePolicy); otherwise it discards it and reports done (someone else
// rotated) or not (the policy was changed: the key stays due if it still
// is, and the next round generates with the new policy).
//
// It does not take the key's lock (keyLock): a manual rotation of the key
// does not wait for a scheduled generation (minutes for an HE keyset).
// The guard keeps the two apart as it does two replicas: whichever
// commits second finds the key changed, the scheduler skips, a manual
// rotation starts over with the next number (rotate).
func (s *Service) scheduledRotate(ctx context.Context, seen *Key, kind KeyKind) (bool, error) {
	name := seen.Name
	n := seen.Latest + 1
	v, release, err := s.newVersion(ctx, name, kind, n, seen.Policy)
	if KindOf(err) == KindExhausted {
		return false, nil // a request took the last generation slot: next round
	}
	if err != nil {
		return false, err
	}
	var why string // why the guard refused
	err = s.update(ctx, name, func(tx KeyTx) ([]*AuditRecord, error) {
		k := tx.Key()
		due, _ := k.RotationDue(s.clock.Now())
		switch {
		case k.Latest != seen.Latest:
			why = "rotated by another"
			return nil, errNotDue
		case !samePolicy(k.Policy, seen.Policy):
			why = "its policy changed: generated again with the new one next round"
			return nil, errNotDue
		case !due:
			why = "no longer due"
			return nil, errNotDue
		}
		if err := tx.AddVersion(v.Clone()); err != nil {
			return nil, err
		}
		k.Primary, k.LatestCreatedAt = n, v.CreatedAt
		return s.systemRecord(ScheduledRotationOp, name, n), nil
	})
	release()
	if errors.Is(err, errNotDue) {
		s.discard(kind, v)
		s.log.Info("scheduled rotation skipped: the key changed since the scan", "key", name, "why", why)
		return why == "rotated by another", nil
	}
	if err != nil {
		s.discard(kind, v)
		return false, err
	}
	s.rot.scheduled.Add(1)
	s.log.Info("scheduled rotation", "key", name, "version", n, "period", FormatPeriod(seen.Policy.RotationPeriod))
	return true, nil
}

// samePolicy reports whether a version made under policy b is one policy a
// would make: the policies are equal but for the rotation period (the
// guard checks the key is still due under its new period). A PATCH of the
// HE fields (params, rotations...) during a long generation is not
// silently lost.
func samePolicy(a, b Policy) bool {
	a.RotationPeriod, b.RotationPeriod = 0, 0
	ja, errA := json.Marshal(a)
	jb, errB := json.Marshal(b)
	return errA == nil && errB == nil && bytes.Equal(ja, jb)
}
