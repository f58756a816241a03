package kms_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/internal/testhsm"
	"github.com/kmsd-project/kmsd/internal/testutil"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/kms/pqc"
	"github.com/kmsd-project/kmsd/store/bolt"
)

func rotateDue(t *testing.T, s *kms.Service) int {
	t.Helper()
	n, err := s.RotateDue(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestScheduledRotation: with a fake clock, a key with a rotation_period
// rotates when due and not before, once after several missed periods (the
// next one a period after that rotation), a manual rotation restarts the
// schedule, a key without a period is never rotated, and removing the
// period stops it.
func TestScheduledRotation(t *testing.T) {
	e := newEnv(t, 0)
	day := 24 * time.Hour
	k := e.create(t, "k", "ml-dsa-65", kms.Policy{RotationPeriod: day})
	e.create(t, "plain", "ml-kem-768", kms.Policy{})
	next, ok := k.NextRotation()
	if !ok || !next.Equal(e.clock.Now().Add(day)) {
		t.Fatalf("next rotation %v %v, want a day from now", next, ok)
	}
	if n := rotateDue(t, e.svc); n != 0 {
		t.Fatalf("rotated %d keys at creation", n)
	}
	e.clock.Add(day - time.Second)
	if n := rotateDue(t, e.svc); n != 0 {
		t.Fatalf("rotated %d keys a second before due", n)
	}
	e.clock.Add(time.Second)
	if n := rotateDue(t, e.svc); n != 1 {
		t.Fatalf("rotated %d keys when due, want 1", n)
	}
	k, vs := e.get(t, "k")
	if k.Latest != 2 || k.Primary != 2 || !vs[1].CreatedAt.Equal(e.clock.Now()) || !k.LatestCreatedAt.Equal(e.clock.Now()) {
		t.Fatalf("after the due rotation: %+v", k)
	}
	if n := rotateDue(t, e.svc); n != 0 {
		t.Fatalf("rotated %d keys twice at the same time", n)
	}

	// Downtime: five periods and a bit missed; one rotation.
	e.clock.Add(5*day + time.Hour)
	if n := rotateDue(t, e.svc); n != 1 {
		t.Fatalf("after missing five periods rotated %d, want 1", n)
	}
	if n := rotateDue(t, e.svc); n != 0 {
		t.Fatalf("a second round after the downtime rotated %d", n)
	}
	k, _ = e.get(t, "k")
	if next, _ := k.NextRotation(); k.Latest != 3 || !next.Equal(e.clock.Now().Add(day)) {
		t.Fatalf("after the downtime: latest %d, next %v; want 3, a day from now", k.Latest, next)
	}

	// A manual rotation restarts the schedule.
	e.clock.Add(day / 2)
	if _, _, err := e.svc.Rotate(ctx, "k"); err != nil {
		t.Fatal(err)
	}
	e.clock.Add(day / 2)
	if n := rotateDue(t, e.svc); n != 0 {
		t.Fatalf("rotated %d half a period after a manual rotation", n)
	}
	e.clock.Add(day / 2)
	if n := rotateDue(t, e.svc); n != 1 {
		t.Fatalf("rotated %d a period after the manual rotation", n)
	}
	if st := e.svc.RotationStats(); st.ScheduledRotations != 3 || st.ScheduledFailures != 0 || st.OverdueKeys != 0 || st.ScanFailures != 0 || !st.LastCompleteScan.Equal(e.clock.Now()) {
		t.Fatalf("stats %+v", st)
	}

	// Removing the period turns it off.
	if _, err := e.svc.UpdateKey(ctx, "k", kms.KeyUpdate{PatchPolicy: func(p kms.Policy) (kms.Policy, error) { p.RotationPeriod = 0; return p, nil }}); err != nil {
		t.Fatal(err)
	}
	e.clock.Add(10 * day)
	if n := rotateDue(t, e.svc); n != 0 {
		t.Fatalf("rotated %d keys with no period", n)
	}
	if k, _ := e.get(t, "plain"); k.Latest != 1 {
		t.Fatalf("a key without a period has %d versions", k.Latest)
	}
	k, _ = e.get(t, "k")
	if _, ok := k.NextRotation(); ok || k.Latest != 5 {
		t.Fatalf("after removing the period: %+v", k)
	}

	// Setting a period on a key schedules from its latest version.
	if _, err := e.svc.UpdateKey(ctx, "plain", kms.KeyUpdate{PatchPolicy: func(p kms.Policy) (kms.Policy, error) { p.RotationPeriod = day; return p, nil }}); err != nil {
		t.Fatal(err)
	}
	if n := rotateDue(t, e.svc); n != 1 {
		t.Fatalf("a key given a period 10 days after its creation: rotated %d", n)
	}
}

// TestScheduledRotationFailureStaysDue: a rotation whose commit fails
// changes nothing, counts as a failure and is tried again next round.
func TestScheduledRotationFailureStaysDue(t *testing.T) {
	e := newEnv(t, 0)
	e.create(t, "k", "ml-kem-768", kms.Policy{RotationPeriod: time.Hour})
	e.clock.Add(3 * time.Hour)
	e.store.failUpdate.Store(true)
	if n := rotateDue(t, e.svc); n != 0 {
		t.Fatalf("rotated %d with the store failing", n)
	}
	st := e.svc.RotationStats()
	if st.ScheduledFailures != 1 || st.OverdueKeys != 1 || st.OldestOverdue != 2*time.Hour {
		t.Fatalf("stats after a failure: %+v", st)
	}
	if k, _ := e.get(t, "k"); k.Latest != 1 {
		t.Fatalf("a failed rotation left %d versions", k.Latest)
	}
	e.store.failUpdate.Store(false)
	if n := rotateDue(t, e.svc); n != 1 {
		t.Fatalf("next round rotated %d", n)
	}
	if st := e.svc.RotationStats(); st.OverdueKeys != 0 || st.OldestOverdue != 0 || st.ScheduledRotations != 1 {
		t.Fatalf("stats after the retry: %+v", st)
	}
}

// TestRotationPeriodRefusals: below the server's minimum, negative, above
// ten years: refused at creation and by an update, with why.
func TestRotationPeriodRefusals(t *testing.T) {
	e := newEnv(t, 0)
	for _, c := range []struct {
		d    time.Duration
		want string
	}{
		{30 * time.Minute, "below this server's minimum of 1h"},
		{time.Hour - time.Nanosecond, "below this server's minimum"},
		{-time.Hour, "must be positive"},
		{11 * 365 * 24 * time.Hour, "above the maximum"},
	} {
		_, _, err := e.svc.CreateKey(ctx, "k", "ml-dsa-44", kms.Policy{RotationPeriod: c.d})
		if !errors.Is(err, kms.ErrInvalid) || !strings.Contains(kms.PublicMessage(err), c.want) {
			t.Errorf("create with rotation_period %v: %v, want invalid saying %q", c.d, err, c.want)
		}
	}
	e.create(t, "k", "ml-dsa-44", kms.Policy{RotationPeriod: time.Hour})
	_, err := e.svc.UpdateKey(ctx, "k", kms.KeyUpdate{PatchPolicy: func(p kms.Policy) (kms.Policy, error) { p.RotationPeriod = time.Second; return p, nil }})
	if !errors.Is(err, kms.ErrInvalid) {
		t.Fatalf("update to 1s: %v", err)
	}
	if k, _ := e.get(t, "k"); k.Policy.RotationPeriod != time.Hour {
		t.Fatalf("a refused update changed the period to %v", k.Policy.RotationPeriod)
	}
	for d, want := range map[time.Duration]string{720 * time.Hour: "720h", 90 * time.Minute: "1h30m", 2 * time.Second: "2s", time.Minute: "1m", 1500 * time.Millisecond: "1.5s"} {
		if got := kms.FormatPeriod(d); got != want {
			t.Errorf("FormatPeriod(%v) = %q, want %q", d, got, want)
		}
	}
}

// gateStore holds UpdateKey until gate closes.
type gateStore struct {
	kms.Store
	entered chan struct{}
	gate    chan struct{}
}

func (g *gateStore) UpdateKey(ctx context.Context, name string, fn func(kms.KeyTx) ([]*kms.AuditRecord, error)) error {
	close(g.entered)
	<-g.gate
	return g.Store.UpdateKey(ctx, name, fn)
}

// TestScheduledRotationGuard: two schedulers (two services, as two
// replicas are) on one store rotate the same due key: exactly one version
// is added. First deterministically (A made its version and waits to
// commit while B rotates; A's transaction finds the key changed and
// skips), then with many keys at once.
func TestScheduledRotationGuard(t *testing.T) {
	st, err := bolt.Open(filepath.Join(t.TempDir(), "kms.db"), bolt.Options{Sealer: testhsm.Open(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	clock := testutil.NewClock(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	newSvc := func(s kms.Store) *kms.Service {
		svc, err := kms.NewService(kms.Config{Store: s, Sealer: testhsm.Open(t), Kinds: kms.NewRegistry(pqc.Kinds()...), Clock: clock, MinRotationPeriod: time.Second})
		if err != nil {
			t.Fatal(err)
		}
		return svc
	}
	gated := &gateStore{Store: st, entered: make(chan struct{}), gate: make(chan struct{})}
	a, b := newSvc(gated), newSvc(st)
	if _, _, err := b.CreateKey(ctx, "k", "ml-dsa-65", kms.Policy{RotationPeriod: time.Minute}); err != nil {
		t.Fatal(err)
	}
	clock.Add(time.Minute)
	aDone := make(chan int)
	go func() {
		n, err := a.RotateDue(ctx)
		if err != nil {
			t.Error(err)
		}
		aDone <- n
	}()
	<-gated.entered // A generated version 2 and is about to commit it
	if n := rotateDue(t, b); n != 1 {
		t.Fatalf("B rotated %d", n)
	}
	close(gated.gate)
	<-aDone
	k, err := st.GetKey(ctx, "k")
	if err != nil {
		t.Fatal(err)
	}
	if k.Latest != 2 {
		t.Fatalf("two schedulers made %d versions of one due key, want 2", k.Latest)
	}
	if sa, sb := a.RotationStats(), b.RotationStats(); sa.ScheduledRotations != 0 || sa.ScheduledFailures != 0 || sb.ScheduledRotations != 1 {
		t.Fatalf("stats: A %+v, B %+v", sa, sb)
	}

	// Many keys, both schedulers at once, a few rounds.
	c, d := newSvc(st), newSvc(st)
	const keys = 12
	for i := range keys {
		if _, _, err := c.CreateKey(ctx, fmt.Sprintf("m%02d", i), "ml-kem-768", kms.Policy{RotationPeriod: time.Minute}); err != nil {
			t.Fatal(err)
		}
	}
	for round := 1; round <= 3; round++ {
		clock.Add(time.Minute)
		var wg sync.WaitGroup
		for _, s := range []*kms.Service{c, d} {
			wg.Go(func() {
				if _, err := s.RotateDue(ctx); err != nil {
					t.Error(err)
				}
			})
		}
		wg.Wait()
		for i := range keys {
			k, err := st.GetKey(ctx, fmt.Sprintf("m%02d", i))
			if err != nil {
				t.Fatal(err)
			}
			if k.Latest != uint64(1+round) {
				t.Fatalf("round %d: key %s has %d versions, want %d", round, k.Name, k.Latest, 1+round)
			}
		}
	}
	if sc, sd := c.RotationStats(), d.RotationStats(); sc.ScheduledRotations+sd.ScheduledRotations != 3*(keys+1) || sc.ScheduledFailures+sd.ScheduledFailures != 0 {
		t.Fatalf("stats: %+v, %+v; want %d rotations between them (k's too)", sc, sd, 3*(keys+1))
	}
}

// listFailStore fails ListKeys while fail is set.
type listFailStore struct {
	kms.Store
	fail atomic.Bool
}

func (l *listFailStore) ListKeys(ctx context.Context, after string, limit int) ([]*kms.Key, error) {
	if l.fail.Load() {
		return nil, errors.New("injected: store unreachable")
	}
	return l.Store.ListKeys(ctx, after, limit)
}

// TestRotationScanFailureIsCounted: a scan whose key listing fails counts
// as a scan failure and leaves the last complete scan where it was, so a
// stale timestamp and the counter say the scheduler is blind; the next
// scan that completes moves it and rotates the overdue key.
func TestRotationScanFailureIsCounted(t *testing.T) {
	st, err := bolt.Open(filepath.Join(t.TempDir(), "kms.db"), bolt.Options{Sealer: testhsm.Open(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	clock := testutil.NewClock(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	lf := &listFailStore{Store: st}
	svc, err := kms.NewService(kms.Config{Store: lf, Sealer: testhsm.Open(t), Kinds: kms.NewRegistry(pqc.Kinds()...), Clock: clock})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := svc.CreateKey(ctx, "k", "ml-kem-768", kms.Policy{RotationPeriod: time.Hour}); err != nil {
		t.Fatal(err)
	}
	if n := rotateDue(t, svc); n != 0 {
		t.Fatalf("rotated %d at creation", n)
	}
	complete := clock.Now()
	clock.Add(5 * time.Hour)
	lf.fail.Store(true)
	for range 3 {
		if _, err := svc.RotateDue(ctx); !errors.Is(err, kms.ErrUnavailable) {
			t.Fatalf("a scan whose listing fails: %v, want unavailable", err)
		}
		clock.Add(time.Minute)
	}
	if rs := svc.RotationStats(); rs.ScanFailures != 3 || !rs.LastCompleteScan.Equal(complete) {
		t.Fatalf("after three failed scans: %+v; want 3 scan failures and the last complete scan at %v", rs, complete)
	}
	lf.fail.Store(false)
	if n := rotateDue(t, svc); n != 1 {
		t.Fatalf("the scan after the store came back rotated %d", n)
	}
	if rs := svc.RotationStats(); rs.ScanFailures != 3 || !rs.LastCompleteScan.Equal(clock.Now()) || rs.ScheduledFailures != 0 {
		t.Fatalf("after a complete scan: %+v", rs)
	}
}

// TestRotationFiguresResetWhenLeadershipEnds: a process that stops leading
// rotation (RunRotation returns) reports no overdue keys: the leader
// reports them.
func TestRotationFiguresResetWhenLeadershipEnds(t *testing.T) {
	e := newEnv(t, 0)
	e.create(t, "x", "ml-kem-768", kms.Policy{RotationPeriod: time.Hour})
	e.clock.Add(3 * time.Hour)
	e.store.failUpdate.Store(true)
	defer e.store.failUpdate.Store(false)
	rotateDue(t, e.svc)
	if rs := e.svc.RotationStats(); rs.OverdueKeys != 1 || rs.OldestOverdue != 2*time.Hour {
		t.Fatalf("stats while leading: %+v", rs)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel() // the lease of "rotation" is lost
	e.svc.RunRotation(cctx)
	if rs := e.svc.RotationStats(); rs.OverdueKeys != 0 || rs.OldestOverdue != 0 {
		t.Fatalf("after this process stopped leading rotation: %+v, want no overdue figures", rs)
	}
}

// TestScheduledRotationAfterClockStep: the clock steps a year ahead and
// the scan rotates the key, stamping the version a year ahead; once the
// clock is put right, the next scan sees a latest version made in the
// future, rotates the key, and the schedule runs from the right time
// again instead of a year late.
func TestScheduledRotationAfterClockStep(t *testing.T) {
	e := newEnv(t, 0)
	day := 24 * time.Hour
	e.create(t, "k", "ml-kem-768", kms.Policy{RotationPeriod: 30 * day})
	e.create(t, "fine", "ml-kem-768", kms.Policy{RotationPeriod: 30 * day})
	e.clock.Add(365 * day) // the clock jumps a year ahead
	if n := rotateDue(t, e.svc); n != 2 {
		t.Fatalf("rotated %d", n)
	}
	e.clock.Add(-365 * day) // and is put right
	e.clock.Add(time.Hour)
	// "fine" is made now: only what was stamped in the future is due.
	if _, _, err := e.svc.Rotate(ctx, "fine"); err != nil {
		t.Fatal(err)
	}
	if n := rotateDue(t, e.svc); n != 1 {
		t.Fatalf("the scan after the clock was put right rotated %d, want 1 (k)", n)
	}
	k, _ := e.get(t, "k")
	if next, _ := k.NextRotation(); k.Latest != 3 || !k.LatestCreatedAt.Equal(e.clock.Now()) || !next.Equal(e.clock.Now().Add(30*day)) {
		t.Fatalf("after the clock was put right: latest %d made %v, next rotation %v; want 3, now, 30 days from now", k.Latest, k.LatestCreatedAt, next)
	}
	if n := rotateDue(t, e.svc); n != 0 {
		t.Fatalf("the next scan rotated %d", n)
	}
	e.clock.Add(30 * day)
	if n := rotateDue(t, e.svc); n != 2 {
		t.Fatalf("a period later rotated %d, want both", n)
	}
	// Made within the slack (a clock a few seconds behind another
	// replica's): not due.
	e.create(t, "skew", "ml-kem-768", kms.Policy{RotationPeriod: 30 * day})
	e.clock.Add(-30 * time.Second)
	if n := rotateDue(t, e.svc); n != 0 {
		t.Fatalf("a key made 30 s in the future rotated (%d)", n)
	}
}

// fakeHE is an HE kind (kms.KeysetKind) whose keyset generation calls gen
// first, which may fail or hold it, as a real one that takes minutes.
type fakeHE struct {
	gen     func(p kms.Policy) error
	removed atomic.Int64
}

func (*fakeHE) Name() string                            { return "fake-he" }
func (*fakeHE) Operations() []kms.Operation             { return []kms.Operation{kms.OpDecrypt} }
func (*fakeHE) Load(kms.Secret) (kms.PrivateKey, error) { return nil, nil }
func (*fakeHE) Generate(io.Reader) (kms.Secret, []byte, error) {
	return kms.Secret{}, nil, errors.New("keyset kind")
}
func (*fakeHE) CheckPolicy(p kms.Policy) (kms.Policy, int64, error) { return p, 1 << 10, nil }
func (f *fakeHE) RemoveBlobs(d []string)                            { f.removed.Add(int64(len(d))) }
func (f *fakeHE) GenerateKeyset(ctx context.Context, seed kms.Secret, p kms.Policy, _ func(int, int, int64)) (*kms.Keyset, error) {
	if f.gen != nil {
		if err := f.gen(p); err != nil {
			return nil, err
		}
	}
	sum := sha256.Sum256(seed.Reveal())
	return &kms.Keyset{ParamsID: "fake", Params: json.RawMessage(`{}`), PublicKey: kms.BlobRef{Digest: "sha256:" + hex.EncodeToString(sum[:]), Size: 1}}, nil
}

// newHEEnv is a service with the fake HE kind and the PQC kinds, an
// identity key (manifests are signed) and gens generation slots.
func newHEEnv(t *testing.T, gens int) (*kms.Service, *fakeHE, *testutil.Clock) {
	t.Helper()
	st, err := bolt.Open(filepath.Join(t.TempDir(), "kms.db"), bolt.Options{Sealer: testhsm.Open(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	he := &fakeHE{}
	clock := testutil.NewClock(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	svc, err := kms.NewService(kms.Config{Store: st, Sealer: testhsm.Open(t), Kinds: kms.NewRegistry(append(pqc.Kinds(), he)...), Clock: clock, MaxGenerations: gens})
	if err != nil {
		t.Fatal(err)
	}
	if err := svc.EnsureIdentity(ctx); err != nil {
		t.Fatal(err)
	}
	return svc, he, clock
}

func latestOf(t *testing.T, svc *kms.Service, name string) uint64 {
	t.Helper()
	k, _, _, err := svc.GetKey(ctx, name, 0, 1)
	if err != nil {
		t.Fatal(err)
	}
	return k.Latest
}

// TestScheduledRotationBacksOffFailingHEKey: two due HE keys, the first
// (by name) fails its generation every time: it does not take the one HE
// attempt of every round, the second rotates within two rounds, and the
// failing key is retried later with growing intervals, then rotates once
// its generation works again.
func TestScheduledRotationBacksOffFailingHEKey(t *testing.T) {
	svc, he, clock := newHEEnv(t, 1)
	for _, n := range []string{"a", "b"} {
		if _, _, err := svc.CreateKey(ctx, n, "fake-he", kms.Policy{Params: json.RawMessage(`"` + n + `"`), RotationPeriod: time.Hour}); err != nil {
			t.Fatal(err)
		}
	}
	var tries atomic.Int64
	broken := atomic.Bool{}
	broken.Store(true)
	he.gen = func(p kms.Policy) error {
		if string(p.Params) == `"a"` {
			tries.Add(1)
			if broken.Load() {
				return errors.New("injected: parameters refused")
			}
		}
		return nil
	}
	clock.Add(time.Hour)
	for round := 1; round <= 2 && latestOf(t, svc, "b") == 1; round++ {
		rotateDue(t, svc)
		clock.Add(time.Minute) // the default check interval
	}
	if latestOf(t, svc, "b") != 2 {
		t.Fatalf("b was not rotated in two rounds while a fails (a tried %d times)", tries.Load())
	}
	// a is retried with growing intervals: over 30 one-minute rounds,
	// a handful of tries, not 30.
	tries.Store(0)
	for range 30 {
		rotateDue(t, svc)
		clock.Add(time.Minute)
	}
	if n := tries.Load(); n < 2 || n > 6 {
		t.Fatalf("a failing HE key was tried %d times in 30 rounds, want a few (backing off)", n)
	}
	if rs := svc.RotationStats(); rs.OverdueKeys != 1 {
		t.Fatalf("stats %+v, want a overdue", rs)
	}
	broken.Store(false)
	clock.Add(2 * time.Hour) // past any backoff
	if n := rotateDue(t, svc); n != 1 || latestOf(t, svc, "a") != 2 {
		t.Fatalf("once its generation works, a rotated (%d): latest %d", n, latestOf(t, svc, "a"))
	}
}

// TestManualRotateDuringScheduledGeneration: a manual rotation of a key
// whose scheduled HE generation runs does not wait for it; the scheduled
// one then finds the key rotated and commits nothing.
func TestManualRotateDuringScheduledGeneration(t *testing.T) {
	svc, he, clock := newHEEnv(t, 2)
	if _, _, err := svc.CreateKey(ctx, "k", "fake-he", kms.Policy{RotationPeriod: time.Hour}); err != nil {
		t.Fatal(err)
	}
	entered, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	he.gen = func(kms.Policy) error {
		first := false
		once.Do(func() { first = true })
		if first {
			close(entered)
			<-release
		}
		return nil
	}
	clock.Add(time.Hour)
	sched := make(chan int)
	go func() {
		n, err := svc.RotateDue(ctx)
		if err != nil {
			t.Error(err)
		}
		sched <- n
	}()
	<-entered // the scheduled generation runs
	manual := make(chan error)
	go func() {
		_, v, err := svc.Rotate(ctx, "k")
		if err == nil && v.Number != 2 {
			err = fmt.Errorf("manual rotation made version %d, want 2", v.Number)
		}
		manual <- err
	}()
	select {
	case err := <-manual:
		if err != nil {
			t.Error(err)
		}
	case <-time.After(10 * time.Second):
		close(release)
		<-sched
		t.Fatal("a manual rotation waited for the scheduled generation of the same key")
	}
	close(release)
	<-sched
	if n := latestOf(t, svc, "k"); n != 2 {
		t.Fatalf("%d versions, want 2 (the manual rotation's; the scheduled one skipped)", n)
	}
	if rs := svc.RotationStats(); rs.ScheduledRotations != 0 || rs.ScheduledFailures != 0 || rs.OverdueKeys != 0 {
		t.Fatalf("stats %+v", rs)
	}
	if he.removed.Load() == 0 {
		t.Fatal("the scheduled generation's blobs were not removed")
	}

	// The other order: the manual rotation generates, the scheduled one
	// commits first; the manual one starts over and makes the next version.
	entered, release, once = make(chan struct{}), make(chan struct{}), sync.Once{}
	clock.Add(time.Hour)
	go func() {
		_, v, err := svc.Rotate(ctx, "k")
		if err == nil && v.Number != 4 {
			err = fmt.Errorf("manual rotation made version %d, want 4", v.Number)
		}
		manual <- err
	}()
	<-entered
	if n := rotateDue(t, svc); n != 1 {
		t.Fatalf("the scheduler rotated %d while a manual rotation generated", n)
	}
	close(release)
	if err := <-manual; err != nil {
		t.Fatal(err)
	}
	if n := latestOf(t, svc, "k"); n != 4 {
		t.Fatalf("%d versions, want 4", n)
	}
}

// TestScheduledRotationRefusedWhenPolicyChanged: a policy PATCH that
// commits while the scheduled generation runs (with the policy the scan
// saw) makes its commit refused; the key stays due and the next round
// generates with the new policy.
func TestScheduledRotationRefusedWhenPolicyChanged(t *testing.T) {
	svc, he, clock := newHEEnv(t, 1)
	if _, _, err := svc.CreateKey(ctx, "k", "fake-he", kms.Policy{Rotations: []int{1}, RotationPeriod: time.Hour}); err != nil {
		t.Fatal(err)
	}
	var gens []kms.Policy
	patched := false
	he.gen = func(p kms.Policy) error {
		gens = append(gens, p)
		if !patched {
			patched = true
			_, err := svc.UpdateKey(ctx, "k", kms.KeyUpdate{PatchPolicy: func(p kms.Policy) (kms.Policy, error) { p.Rotations = []int{1, 2}; return p, nil }})
			return err
		}
		return nil
	}
	clock.Add(time.Hour)
	if n := rotateDue(t, svc); n != 0 || latestOf(t, svc, "k") != 1 {
		t.Fatalf("a version generated with the policy from before a PATCH committed (%d)", n)
	}
	if rs := svc.RotationStats(); rs.OverdueKeys != 1 || rs.ScheduledFailures != 0 {
		t.Fatalf("stats %+v, want k overdue and no failure", rs)
	}
	if n := rotateDue(t, svc); n != 1 || latestOf(t, svc, "k") != 2 {
		t.Fatalf("the next round rotated %d", n)
	}
	if len(gens) != 2 || !slices.Equal(gens[1].Rotations, []int{1, 2}) {
		t.Fatalf("generations with %+v, want the second with rotations [1 2]", gens)
	}
	// A change of the period alone does not refuse it (the guard checks
	// the key is still due): two hours after the last rotation, the
	// period becomes two hours.
	patched = false
	he.gen = func(p kms.Policy) error {
		if !patched {
			patched = true
			_, err := svc.UpdateKey(ctx, "k", kms.KeyUpdate{PatchPolicy: func(p kms.Policy) (kms.Policy, error) { p.RotationPeriod = 2 * time.Hour; return p, nil }})
			return err
		}
		return nil
	}
	clock.Add(2 * time.Hour)
	if n := rotateDue(t, svc); n != 1 {
		t.Fatalf("a PATCH of the period alone (still due) refused the rotation: %d", n)
	}
}
