package app

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/hsm"
	"github.com/kmsd-project/kmsd/kms"
)

// KEK rotation. The store's metadata says which KEKs the data is sealed
// under: "sealed-under" names the primary (what new secrets are sealed
// under; kmsd opens the HSM by it at start), "kek-ring" the others that
// still open, "kek-rotation" where a rotation stands. A rotation makes a
// new KEK in the token, makes it primary (every replica follows within
// ringEvery), then one elected process seals every secret again under it
// (kms.Service.Rewrap, a key at a time, resuming from the last key done
// after a crash), then the store's record key, then counts that nothing
// is left under another KEK. kmsctl kek retire then destroys an old KEK
// in the token, refused while anything is sealed under it.

const (
	metaSealedUnder = "sealed-under"
	metaRing        = "kek-ring"
	metaRotation    = "kek-rotation"
	// ringEvery is how often every process reads the ring from the store.
	ringEvery = time.Second
	// claimantGone is how long a rotation's claimant has to make its KEK
	// before another process takes the rotation over (and may make it).
	claimantGone = time.Minute
	// switchGrace is how long after the switch a rotation on a shared
	// store counts before it is done: every replica follows the ring
	// within ringEvery, and commits what it sealed before within
	// milliseconds of the seal. (One process fences its own.)
	switchGrace = 3 * ringEvery
)

// Rotation states.
const (
	RotationCreating   = "creating"   // the new KEK is being made in the token
	RotationRewrapping = "rewrapping" // the new KEK is primary; secrets are being sealed again
	RotationDone       = "done"       // nothing is sealed under another KEK
)

// ring is a sealer with a KEK ring (hsm.Sealer).
type ring interface {
	kms.KEKRing
	NewKEK(ctx context.Context, id string) error
	FindKEK(ctx context.Context, id string) error
	SetRing(primary string, others []string) error
	KEKs() (primary string, others []string)
	DestroyKEK(ctx context.Context, id string) error
}

// metaStore is a store's metadata.
type metaStore interface {
	Meta(key string) ([]byte, error)
	PutMeta(key string, value []byte) error
	ClaimMeta(key string, value []byte) ([]byte, error)
}

// recordKeyResealer is a store whose record key is sealed under the KEK.
type recordKeyResealer interface {
	ResealRecordKey(ctx context.Context) (bool, error)
	RecordKeyKEK(ctx context.Context) (string, error)
}

type kekRing struct {
	Others []string `json:"others"`
}

// kekState is the KEK rotation's part of App.
type kekState struct {
	nonce string        // this process, in the rotation claims it makes
	mu    sync.Mutex    // one rotate or retire at a time in this process
	kick  chan struct{} // wakes the rewrap job
	// saw is when this process first saw each rotation (by seq) switched
	// (its monotonic clock): the grace runs from there, whatever the
	// clocks of the processes that requested and switched it say.
	sawMu sync.Mutex
	saw   map[int]time.Time
}

// rotationClaim is the value a rotation's sequence number is claimed
// with: the new KEK's id and when.
type rotationClaim struct {
	To string    `json:"to"`
	At time.Time `json:"at"`
	By string    `json:"by"` // the claiming process (App.nonce)
}

// sawSwitch is when this process first saw rotation rot switched.
func (a *App) sawSwitch(rot *client.KEKRotation) time.Time {
	a.kek.sawMu.Lock()
	defer a.kek.sawMu.Unlock()
	if a.kek.saw == nil {
		a.kek.saw = map[int]time.Time{}
	}
	t, ok := a.kek.saw[rot.Seq]
	if !ok {
		t = time.Now()
		a.kek.saw[rot.Seq] = t
	}
	return t
}

func (a *App) kekParts() (ring, metaStore, error) {
	r, ok := a.cfg.Sealer.(ring)
	if !ok {
		return nil, nil, kms.Errorf(kms.KindFailedPrecondition, "this kmsd's sealer has no KEK ring")
	}
	m, ok := a.cfg.Store.(metaStore)
	if !ok {
		return nil, nil, kms.Errorf(kms.KindFailedPrecondition, "this kmsd's store keeps no metadata")
	}
	return r, m, nil
}

func (a *App) rotation(m metaStore) (*client.KEKRotation, error) {
	b, err := m.Meta(metaRotation)
	if err != nil || b == nil {
		return nil, err
	}
	var r client.KEKRotation
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("the store's KEK rotation record does not decode: %w", err)
	}
	return &r, nil
}

func putJSON(m metaStore, key string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return m.PutMeta(key, b)
}

// errNoKEKRecord: the store names no KEK (a store kmsd did not start on).
var errNoKEKRecord = kms.Errorf(kms.KindFailedPrecondition, "the store has no record of the KEK it is sealed under")

// readRing reads the ring from the store: the primary and the others.
func readRing(m metaStore) (string, []string, error) {
	b, err := m.Meta(metaSealedUnder)
	if err != nil {
		return "", nil, err
	}
	var ref struct {
		ID string `json:"id"`
	}
	if b == nil {
		return "", nil, errNoKEKRecord
	}
	if json.Unmarshal(b, &ref) != nil || ref.ID == "" {
		return "", nil, errors.New("the store's record of its KEK (sealed-under) names none")
	}
	var rg kekRing
	if b, err := m.Meta(metaRing); err != nil {
		return "", nil, err
	} else if b != nil {
		if err := json.Unmarshal(b, &rg); err != nil {
			return "", nil, fmt.Errorf("the store's KEK ring does not decode: %w", err)
		}
	}
	return ref.ID, slices.DeleteFunc(rg.Others, func(o string) bool { return o == ref.ID }), nil
}

// setPrimary records id as the primary KEK in the store, the rest of the
// sealed-under record (token, label) as it was.
func setPrimary(m metaStore, id string) error {
	b, err := m.Meta(metaSealedUnder)
	if err != nil {
		return err
	}
	ref := map[string]any{}
	if b != nil {
		if err := json.Unmarshal(b, &ref); err != nil {
			return err
		}
	}
	ref["id"] = id
	return putJSON(m, metaSealedUnder, ref)
}

// checkRing refuses a ring of which the token lacks a KEK that secrets
// are still sealed under (kmsd would start, and those keys fail at use).
func (a *App) checkRing(ctx context.Context) error {
	r, m, err := a.kekParts()
	if err != nil {
		return nil
	}
	_, others, err := readRing(m)
	if errors.Is(err, errNoKEKRecord) {
		return nil
	}
	if err != nil {
		return err
	}
	_, have := r.KEKs()
	var missing []string
	for _, id := range others {
		if !slices.Contains(have, id) {
			missing = append(missing, id)
		}
	}
	if len(missing) == 0 {
		return nil
	}
	counts, err := a.Service.SealedUnder(ctx)
	if err != nil {
		return err
	}
	for _, id := range missing {
		if n := counts[id]; n > 0 {
			return fmt.Errorf("%d secrets are sealed under KEK %s of the store's ring, which the token does not hold (destroyed outside kmsd, or an HSM partner it never reached): restore the key in the HSM, or restore the store from a backup", n, id)
		}
		a.log.Warn("KEK ring: a KEK of the store's ring is not in the token, and nothing is sealed under it", "kek_id", id)
	}
	return nil
}

// followRing makes the sealer's ring the store's.
func (a *App) followRing() error {
	r, m, err := a.kekParts()
	if err != nil {
		return nil // nothing to follow
	}
	primary, others, err := readRing(m)
	if errors.Is(err, errNoKEKRecord) {
		return nil
	}
	if err != nil {
		return err
	}
	p, o := r.KEKs()
	slices.Sort(o)
	want := slices.Sorted(slices.Values(others))
	if p == primary && slices.Equal(o, want) {
		return nil
	}
	return r.SetRing(primary, others)
}

// RotateKEK starts a KEK rotation (an admin over "*"): a new KEK made in
// the token and made primary at once; the rewrap runs in the background
// (KEKStatus follows it).
func (a *App) RotateKEK(ctx context.Context, p *kms.Principal) (*client.KEKStatus, error) {
	if err := p.AuthorizeAll("rotate the KEK"); err != nil {
		return nil, err
	}
	r, m, err := a.kekParts()
	if err != nil {
		return nil, err
	}
	a.kek.mu.Lock()
	defer a.kek.mu.Unlock()
	rot, err := a.rotation(m)
	if err != nil {
		return nil, err
	}
	if rot != nil && rot.State != RotationDone {
		return nil, kms.Errorf(kms.KindFailedPrecondition, "a KEK rotation to %s is under way (%s): wait for it to end (kmsctl kek status)", rot.To, rot.State)
	}
	if err := a.followRing(); err != nil {
		return nil, err
	}
	// The old KEKs are the store's ring (not what the sealer met).
	primary, others, err := readRing(m)
	if err != nil {
		return nil, err
	}
	raw := make([]byte, 16)
	if _, err := rand.Read(raw); err != nil {
		return nil, err
	}
	seq := 1
	if rot != nil {
		seq = rot.Seq + 1
	}
	mine := rotationClaim{To: hex.EncodeToString(raw), At: time.Now().UTC(), By: a.kek.nonce}
	// Rotation seq is claimed in the store (set once, by one process):
	// of two rotations started at once on two replicas, one goes on, and
	// only its claimant makes the KEK.
	b, _ := json.Marshal(mine)
	got, err := m.ClaimMeta(fmt.Sprintf("%s-%d", metaRotation, seq), b)
	if err != nil {
		return nil, err
	}
	var claim rotationClaim
	if err := json.Unmarshal(got, &claim); err != nil || claim.To == "" {
		return nil, fmt.Errorf("the store's claim of KEK rotation %d does not decode", seq)
	}
	rot = &client.KEKRotation{Seq: seq, State: RotationCreating, From: append([]string{primary}, others...), To: claim.To, StartedAt: claim.At, By: p.TokenID}
	if claim.By == a.kek.nonce && claim != mine {
		// This process's own claim, whose record a failed write (or
		// call) left unwritten: it is still the claimant (kek.mu is
		// held: no NewKEK of it runs), and goes on with it.
		a.log.Warn("KEK rotation: going on with this process's claim, never recorded", "seq", seq, "kek", claim.To)
		claim.By, mine = a.kek.nonce, claim
	}
	if claim != mine {
		if time.Since(claim.At) < claimantGone {
			return nil, kms.Errorf(kms.KindFailedPrecondition, "another KEK rotation (to %s) started at %s: wait for it to end (kmsctl kek status)", claim.To, claim.At.Format(time.RFC3339))
		}
		// Claimed long ago and never recorded: its claimant died (or a
		// write failed) between the two. This rotation takes it over;
		// the rewrap job finds its KEK, or makes it.
		a.log.Warn("KEK rotation: taking over a rotation claimed and never recorded", "seq", seq, "kek", claim.To, "claimed_at", claim.At)
		if err := putJSON(m, metaRotation, rot); err != nil {
			return nil, err
		}
	} else {
		// Recorded before the KEK is made: a crash leaves a rotation the
		// job finishes (it finds the KEK by this id, or, once the
		// claimant is surely gone, makes it).
		if err := putJSON(m, metaRotation, rot); err != nil {
			return nil, err
		}
		if err := a.advanceKEK(ctx, r, m, rot, true); err != nil {
			return nil, err
		}
	}
	select {
	case a.kek.kick <- struct{}{}:
	default:
	}
	return a.KEKStatus(ctx, p, false)
}

// advanceKEK takes a rotation from creating to rewrapping: the new KEK in
// the token, recorded in the ring, made primary.
//
// Only the claimant makes the KEK (create); another process (the rewrap
// job, for a rotation it finds creating) finds it, and makes it only once
// the claimant is surely gone: two processes making a KEK of one id would
// leave two keys of one label and id in the token.
func (a *App) advanceKEK(ctx context.Context, r ring, m metaStore, rot *client.KEKRotation, create bool) error {
	var err error
	if create {
		err = r.NewKEK(ctx, rot.To)
	} else if err = r.FindKEK(ctx, rot.To); errors.Is(err, hsm.ErrKEKMissing) && time.Since(rot.StartedAt) > claimantGone {
		err = r.NewKEK(ctx, rot.To)
	}
	if err != nil {
		rot.Error = err.Error()
		_ = putJSON(m, metaRotation, rot)
		return kms.Wrap(kms.KindUnavailable, "make the new KEK in the HSM", err)
	}
	// The others first: a crash before the primary changes leaves the
	// old primary both primary and other, which is harmless.
	if err := putJSON(m, metaRing, kekRing{Others: rot.From}); err != nil {
		return err
	}
	if err := setPrimary(m, rot.To); err != nil {
		return err
	}
	if err := r.SetRing(rot.To, rot.From); err != nil {
		return err
	}
	rot.State, rot.Error = RotationRewrapping, ""
	a.log.Warn("KEK rotation: a new KEK is primary; sealing every secret again under it", "new_kek", rot.To, "old", rot.From)
	return putJSON(m, metaRotation, rot)
}

// KEKStatus is where the KEKs stand (an admin over "*"); count adds how
// many secrets each KEK seals (a read of every version).
func (a *App) KEKStatus(ctx context.Context, p *kms.Principal, count bool) (*client.KEKStatus, error) {
	if err := p.AuthorizeAll("read the KEK status"); err != nil {
		return nil, err
	}
	r, m, err := a.kekParts()
	if err != nil {
		return nil, err
	}
	if err := a.followRing(); err != nil {
		return nil, err
	}
	st := &client.KEKStatus{}
	st.Primary, st.Others = r.KEKs()
	if st.Others == nil {
		st.Others = []string{}
	}
	if st.Rotation, err = a.rotation(m); err != nil {
		return nil, err
	}
	if count {
		if st.SealedUnder, err = a.Service.SealedUnder(ctx); err != nil {
			return nil, err
		}
		if rk, ok := a.cfg.Store.(recordKeyResealer); ok {
			if st.RecordKeyKEK, err = rk.RecordKeyKEK(ctx); err != nil {
				return nil, err
			}
		}
	}
	return st, nil
}

// RetireKEK destroys an old KEK in the token (an admin over "*"), once
// no rotation is under way and nothing is sealed under it: not the
// primary, no version's secret, not the store's record key. Backups
// sealed under it no longer restore.
func (a *App) RetireKEK(ctx context.Context, p *kms.Principal, id string) (*client.KEKStatus, error) {
	if err := p.AuthorizeAll("retire a KEK"); err != nil {
		return nil, err
	}
	r, m, err := a.kekParts()
	if err != nil {
		return nil, err
	}
	if raw, err := hex.DecodeString(id); err != nil || len(raw) == 0 || len(id) > 128 || hex.EncodeToString(raw) != id {
		return nil, kms.Errorf(kms.KindInvalid, "a KEK id is lower-case hex, as kmsctl kek status lists them")
	}
	a.kek.mu.Lock()
	defer a.kek.mu.Unlock()
	if err := a.followRing(); err != nil {
		return nil, err
	}
	primary, others, err := readRing(m)
	if err != nil {
		return nil, err
	}
	if id == primary {
		return nil, kms.Errorf(kms.KindFailedPrecondition, "KEK %s is the primary: it seals new secrets (rotate first)", id)
	}
	if !slices.Contains(others, id) {
		// Only this store's KEKs: the token may hold other data dirs'
		// under the same label.
		return nil, kms.Errorf(kms.KindNotFound, "KEK %s is not one of this store's (kmsctl kek status lists them)", id)
	}
	rot, err := a.rotation(m)
	if err != nil {
		return nil, err
	}
	if rot != nil && rot.State != RotationDone {
		return nil, kms.Errorf(kms.KindFailedPrecondition, "a KEK rotation is under way (%s): retire once it is done", rot.State)
	}
	// Counted and destroyed while no new material is between its seal
	// and its commit in this process (replicas seal under the new
	// primary within ringEvery of the switch; a rotation is done only
	// well after that).
	// What this process sealed before it followed the switch has
	// committed once the drain returns; from then on it seals under the
	// primary only (replicas follow within ringEvery of the switch, and a
	// rotation is done only well after that).
	if err := a.Service.DrainSeals(ctx); err != nil {
		return nil, err
	}
	err = func() error {
		counts, err := a.Service.SealedUnder(ctx)
		if err != nil {
			return err
		}
		if n := counts[id]; n > 0 {
			return kms.Errorf(kms.KindFailedPrecondition, "%d secrets are still sealed under KEK %s: rotate (or finish the rotation) first", n, id)
		}
		if n := counts["?"]; n > 0 {
			return kms.Errorf(kms.KindFailedPrecondition, "%d sealed secrets name no KEK: refusing to destroy any", n)
		}
		if rk, ok := a.cfg.Store.(recordKeyResealer); ok {
			k, err := rk.RecordKeyKEK(ctx)
			if err != nil {
				return err
			}
			if k == id {
				return kms.Errorf(kms.KindFailedPrecondition, "the store's record key is still sealed under KEK %s: finish the rotation first", id)
			}
		}
		rest := slices.DeleteFunc(slices.Clone(others), func(o string) bool { return o == id })
		if err := putJSON(m, metaRing, kekRing{Others: rest}); err != nil {
			return err
		}
		if err := r.DestroyKEK(ctx, id); errors.Is(err, hsm.ErrKEKMissing) {
			return kms.Errorf(kms.KindNotFound, "the HSM holds no KEK %s of this ring (retired already?)", id)
		} else if err != nil {
			return kms.Wrap(kms.KindUnavailable, "destroy the KEK in the HSM", err)
		}
		return r.SetRing(primary, rest)
	}()
	if err != nil {
		return nil, err
	}
	a.log.Warn("KEK retired: destroyed in the token; backups sealed under it no longer restore", "kek_id", id)
	return a.KEKStatus(ctx, p, false)
}

// runRing makes every process follow the ring the store records.
func (a *App) runRing(ctx context.Context) {
	t := time.NewTicker(ringEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if err := a.followRing(); err != nil && ctx.Err() == nil {
			a.log.Error("KEK ring: cannot follow the store's", "err", err)
		}
	}
}

// runRewrap is the elected process's part of a rotation: it finishes one
// that a crash interrupted and rewraps until nothing is left under
// another KEK.
func (a *App) runRewrap(ctx context.Context) {
	r, m, err := a.kekParts()
	if err != nil {
		return
	}
	wait := 0 * time.Second
	for {
		select {
		case <-ctx.Done():
			return
		case <-a.kek.kick:
		case <-time.After(wait):
		}
		wait = 5 * time.Second
		if err := a.rewrapOnce(ctx, r, m); err != nil && ctx.Err() == nil {
			a.log.Error("KEK rotation: the rewrap stopped; it goes on in 5 s", "err", err)
		}
	}
}

func (a *App) rewrapOnce(ctx context.Context, r ring, m metaStore) error {
	a.kek.mu.Lock()
	rot, err := a.rotation(m)
	if err != nil || rot == nil || rot.State == RotationDone {
		a.kek.mu.Unlock()
		return err
	}
	if rot.State == RotationCreating {
		err = a.advanceKEK(ctx, r, m, rot, false)
	}
	a.kek.mu.Unlock()
	if err != nil {
		return err
	}
	if err := a.followRing(); err != nil {
		return err
	}
	a.sawSwitch(rot) // the grace runs from here at the latest
	for {
		last := time.Now()
		st, err := a.Service.Rewrap(ctx, rot.Cursor, func(key string, s kms.RewrapStats) error {
			if time.Since(last) < 500*time.Millisecond {
				return nil
			}
			last = time.Now()
			cur := *rot
			cur.Cursor, cur.Keys, cur.Versions, cur.Rewrapped = key, rot.Keys+s.Keys, rot.Versions+s.Versions, rot.Rewrapped+s.Rewrapped
			return putJSON(m, metaRotation, &cur)
		})
		rot.Keys, rot.Versions, rot.Rewrapped = rot.Keys+st.Keys, rot.Versions+st.Versions, rot.Rewrapped+st.Rewrapped
		if err != nil {
			rot.Error = err.Error()
			_ = putJSON(m, metaRotation, rot)
			return err
		}
		if rk, ok := a.cfg.Store.(recordKeyResealer); ok {
			if _, err := rk.ResealRecordKey(ctx); err != nil {
				return fmt.Errorf("seal the store's record key again: %w", err)
			}
		}
		// A pass is done: count, since a replica that had not yet
		// followed the ring may have sealed under the old KEK meanwhile;
		// and in this process, once what was sealed before the switch
		// has committed (the fence).
		if err := a.Service.DrainSeals(ctx); err != nil {
			return err
		}
		counts, err := a.Service.SealedUnder(ctx)
		if err != nil {
			return err
		}
		// Left: anything not under the store's primary (the rotation's
		// target, which its claim makes the only one).
		primary, _, err := readRing(m)
		if err != nil {
			return err
		}
		if primary != rot.To {
			return fmt.Errorf("the store's primary KEK is %s, the rotation's target %s: refusing to go on", primary, rot.To)
		}
		left := 0
		for id, n := range counts {
			if id != primary {
				left += n
			}
		}
		rot.Passes++
		if left == 0 && a.shared() && time.Since(a.sawSwitch(rot)) < switchGrace {
			// A replica that had not followed the switch yet may still
			// commit something sealed under an old KEK: count again
			// once every process has.
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(switchGrace - time.Since(a.sawSwitch(rot))):
			}
			continue
		}
		if left == 0 {
			now := time.Now().UTC()
			rot.State, rot.Cursor, rot.FinishedAt, rot.Error, rot.SealedUnder = RotationDone, "", &now, "", counts
			a.log.Info("KEK rotation done: every secret is sealed under the new KEK; retire the old with kmsctl kek retire", "kek", rot.To, "rewrapped", rot.Rewrapped, "old", rot.From)
			return putJSON(m, metaRotation, rot)
		}
		rot.Cursor = ""
		if err := putJSON(m, metaRotation, rot); err != nil {
			return err
		}
		// Another pass, after a pause: what is left was sealed by a
		// replica that had not followed the switch yet.
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(ringEvery):
		}
	}
}

// shared reports whether other processes (replicas) share the store.
func (a *App) shared() bool {
	sh, ok := a.cfg.Store.(interface{ Shared() bool })
	return ok && sh.Shared()
}
