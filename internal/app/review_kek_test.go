package app

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/hsm"
	"github.com/kmsd-project/kmsd/internal/testhsm"
	"github.com/kmsd-project/kmsd/internal/testutil"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/store/backup"
	"github.com/kmsd-project/kmsd/store/bolt"
)

func reviewID() string {
	b := make([]byte, 16)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// reviewApp is kmsd as main wires it: a bolt store whose sealed-under
// names the KEK, an app over it.
func reviewApp(t *testing.T, label string) (*App, *hsm.Sealer, *bolt.Store) {
	t.Helper()
	cfg := testhsm.Config(t)
	cfg.KEKLabel = label
	sealer, err := hsm.Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sealer.Close() })
	st, err := bolt.Open(filepath.Join(t.TempDir(), "kms.db"), bolt.Options{Sealer: sealer})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	if err := st.PutMeta("sealed-under", []byte(`{"token":"kmsd-test","label":"`+label+`","id":"`+sealer.KEKID()+`"}`)); err != nil {
		t.Fatal(err)
	}
	a, err := New(context.Background(), Config{Store: st, AuditStore: st.Audit(), Sealer: sealer, AdminToken: func(string) error { return nil }})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.Close)
	return a, sealer, st
}

var reviewAdmin = &kms.Principal{TokenID: "0123456789abcdef", Role: kms.RoleAdmin, Keys: []string{"*"}}

// TestReviewRetirePrimaryInUpperCase: retire refuses the primary, and a
// KEK anything is sealed under, by comparing id strings; the primary's id
// in upper-case hex passes every check and DestroyKEK finds the KEK by
// its bytes: the primary KEK is destroyed and every key is lost.
func TestReviewRetirePrimaryInUpperCase(t *testing.T) {
	ctx := context.Background()
	a, sealer, _ := reviewApp(t, "review-rt-"+reviewID()[:8])
	primary := sealer.KEKID()
	if _, _, err := a.Service.CreateKey(ctx, "payments", "ml-dsa-65", kms.Policy{}); err != nil {
		t.Fatal(err)
	}
	if _, err := a.RetireKEK(ctx, reviewAdmin, primary); err == nil {
		t.Fatal("retire of the primary accepted")
	}
	_, err := a.RetireKEK(ctx, reviewAdmin, strings.ToUpper(primary))
	t.Logf("retire %s: %v", strings.ToUpper(primary), err)
	if err == nil {
		t.Errorf("retire of the primary KEK, its id in upper case, accepted: the KEK is destroyed")
	}
	if _, _, err := a.Service.Sign(ctx, "payments", []byte("m"), nil); err != nil {
		t.Errorf("signing with a key after the retire: %v", err)
	}
}

// TestReviewRetireForeignKEK: retire takes any id, in the ring or not;
// a KEK of another data dir made on the same token under the same label
// (which hsm.Config.KEKID says is supported) has nothing sealed under it
// in this store, so it is destroyed.
func TestReviewRetireForeignKEK(t *testing.T) {
	ctx := context.Background()
	label := "review-fk-" + reviewID()[:8]
	a, _, _ := reviewApp(t, label)
	// Another deployment's KEK on the same token, same label.
	cfg := testhsm.Config(t)
	cfg.KEKLabel = label
	cfg.CreateKEK = false
	other, err := hsm.Open(cfg)
	if err == nil {
		defer other.Close()
	}
	foreign := reviewID()
	if err := other.NewKEK(ctx, foreign); err != nil {
		t.Fatal(err)
	}
	st, _ := a.KEKStatus(ctx, reviewAdmin, false)
	t.Logf("this kmsd's ring: primary %s others %v; retiring %s", st.Primary, st.Others, foreign)
	if _, err := a.RetireKEK(ctx, reviewAdmin, foreign); err == nil {
		t.Errorf("retire of KEK %s, not in this kmsd's ring (another data dir's), accepted: destroyed in the token", foreign)
	}
}

// TestReviewConcurrentRotations: two replicas (two processes on one
// store) each take a POST /v1/kek/rotate at the same moment (two admins,
// or a client retrying on another replica). Nothing in the store makes
// the second wait: each records its rotation, makes its KEK, records it
// as primary. Afterwards the store's primary (sealed-under) and the
// rotation's target may be two different KEKs; the rewrap then never
// counts zero secrets outside rotation.To and loops without a pause.
func TestReviewConcurrentRotations(t *testing.T) {
	ctx := context.Background()
	mismatch, both := 0, 0
	for trial := 0; trial < 12 && mismatch == 0; trial++ {
		label := "review-cr-" + reviewID()[:8]
		a, sealerA, st := reviewApp(t, label)
		cfg := testhsm.Config(t)
		cfg.KEKLabel, cfg.KEKID, cfg.CreateKEK = label, sealerA.KEKID(), false
		sealerB, err := hsm.Open(cfg)
		if err != nil {
			t.Fatal(err)
		}
		b, err := New(ctx, Config{Store: st, AuditStore: st.Audit(), Sealer: sealerB, AdminToken: func(string) error { return nil }})
		if err != nil {
			t.Fatal(err)
		}
		errs := make(chan error, 2)
		go func() { _, err := a.RotateKEK(ctx, reviewAdmin); errs <- err }()
		go func() { _, err := b.RotateKEK(ctx, reviewAdmin); errs <- err }()
		e1, e2 := <-errs, <-errs
		if e1 == nil && e2 == nil {
			both++
		}
		primary, _, _ := readRing(st)
		rot, _ := a.rotation(st)
		if rot != nil && rot.To != primary {
			mismatch++
			t.Logf("trial %d: the store's primary is %s, the rotation's target %s", trial, primary, rot.To)
			// What the rewrap job then does, for 2 s.
			rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			a.followRing()
			_ = a.rewrapOnce(rctx, sealerA, st)
			cancel()
			rot, _ = a.rotation(st)
			t.Logf("after 2 s of rewrap: state %s, %d passes, error %q", rot.State, rot.Passes, rot.Error)
		}
		b.Close()
		sealerB.Close()
	}
	if both > 0 {
		t.Errorf("two rotations started at once were both accepted (%d of the trials)", both)
	}
	if mismatch > 0 {
		t.Errorf("the store's primary KEK and the rotation's target differ after two concurrent rotations (%d trials)", mismatch)
	}
}

// slowRotationWrites delays this process's writes of the rotation record
// once it is rewrapping (a slow store write, a GC pause).
type slowRotationWrites struct{ *bolt.Store }

func (s slowRotationWrites) PutMeta(key string, value []byte) error {
	if key == metaRotation && strings.Contains(string(value), `"rewrapping"`) {
		time.Sleep(300 * time.Millisecond)
	}
	return s.Store.PutMeta(key, value)
}

// slowPrimaryWrite delays this process's write of the primary.
type slowPrimaryWrite struct{ *bolt.Store }

func (s slowPrimaryWrite) PutMeta(key string, value []byte) error {
	if key == metaSealedUnder {
		time.Sleep(100 * time.Millisecond)
	}
	return s.Store.PutMeta(key, value)
}

// TestReviewConcurrentRotationsDiverge: the same two concurrent rotations,
// with B's last write late: the store's primary is A's new KEK, the
// rotation record B's. The rewrap then loops.
func TestReviewConcurrentRotationsDiverge(t *testing.T) {
	ctx := context.Background()
	label := "review-cd-" + reviewID()[:8]
	a0, sealerA, st := reviewApp(t, label)
	a0.Close()
	a, err := New(ctx, Config{Store: slowPrimaryWrite{st}, AuditStore: st.Audit(), Sealer: sealerA, AdminToken: func(string) error { return nil }})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	cfg := testhsm.Config(t)
	cfg.KEKLabel, cfg.KEKID, cfg.CreateKEK = label, sealerA.KEKID(), false
	sealerB, err := hsm.Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer sealerB.Close()
	b, err := New(ctx, Config{Store: slowRotationWrites{st}, AuditStore: st.Audit(), Sealer: sealerB, AdminToken: func(string) error { return nil }})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if _, _, err := a.Service.CreateKey(ctx, "payments", "ml-dsa-65", kms.Policy{}); err != nil {
		t.Fatal(err)
	}
	errs := make(chan error, 2)
	go func() { _, err := b.RotateKEK(ctx, reviewAdmin); errs <- err }()
	go func() { _, err := a.RotateKEK(ctx, reviewAdmin); errs <- err }()
	t.Logf("the two rotations: %v; %v", <-errs, <-errs)
	primary, others, _ := readRing(st)
	rot, _ := a.rotation(st)
	t.Logf("store: primary %s, ring others %v; rotation record: %s to %s", primary, others, rot.State, rot.To)
	if rot.To == primary {
		t.Skip("no divergence this time")
	}
	rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	a.followRing()
	err = a.rewrapOnce(rctx, sealerA, st)
	rot, _ = a.rotation(st)
	t.Logf("rewrap for 2 s: %v; state %s, %d passes", err, rot.State, rot.Passes)
	if rot.State != RotationDone {
		t.Errorf("the rotation never ends: %d passes in 2 s (every secret is under the store's primary %s, none under the rotation's %s); rotate and retire are refused meanwhile", rot.Passes, primary, rot.To)
	}
}

// versionCatcher keeps a backup's versions and its sealed-under record.
type versionCatcher struct {
	backup.Discard
	versions    map[string]*kms.Version
	sealedUnder []byte
}

func (c *versionCatcher) Version(key string, v *kms.Version) error {
	c.versions[key] = v
	return nil
}

func (c *versionCatcher) Meta(name string, value []byte) error {
	if name == "sealed-under" {
		c.sealedUnder = value
	}
	return nil
}

// TestReviewMidRotationBackupRestoresBroken (an outside review's
// finding): a backup taken while a rotation rewraps (the identity key,
// "_identity", is rewrapped before "zebra") holds secrets under both
// KEKs. Once the old KEK was retired, kmsd restore's checks (file,
// signature, the sealed-under KEK, the identity key) all passed and
// zebra's secret opened under no KEK. Restore now checks every KEK the
// backup's secrets are under, and names what would be lost.
func TestReviewMidRotationBackupRestoresBroken(t *testing.T) {
	ctx := context.Background()
	label := "review-mr-" + reviewID()[:8]
	a, sealer, st := reviewApp(t, label)
	old := sealer.KEKID()
	if _, _, err := a.Service.CreateKey(ctx, "zebra", "ml-dsa-65", kms.Policy{}); err != nil {
		t.Fatal(err)
	}
	if _, err := a.RotateKEK(ctx, reviewAdmin); err != nil {
		t.Fatal(err)
	}
	stop := errors.New("the backup runs now")
	_, err := a.Service.Rewrap(ctx, "", func(key string, _ kms.RewrapStats) error {
		if key == kms.IdentityKeyName {
			return stop
		}
		return nil
	})
	if !errors.Is(err, stop) {
		t.Fatalf("partial rewrap: %v", err)
	}
	var buf bytes.Buffer
	if _, _, err := a.Backup(ctx, &buf, false); err != nil {
		t.Fatal(err)
	}
	if err := a.rewrapOnce(ctx, sealer, st); err != nil {
		t.Fatal(err)
	}
	if _, err := a.RetireKEK(ctx, reviewAdmin, old); err != nil {
		t.Fatalf("retire the old KEK after the rotation: %v", err)
	}
	// kmsd restore's checks, as restore.go makes them.
	vc := &versionCatcher{versions: map[string]*kms.Version{}}
	f, err := backup.Read(bytes.NewReader(buf.Bytes()), vc)
	if err != nil {
		t.Fatal(err)
	}
	if err := backup.Verify(f); err != nil {
		t.Fatal(err)
	}
	var ref struct{ ID string }
	json.Unmarshal(vc.sealedUnder, &ref)
	cfg := testhsm.Config(t)
	cfg.KEKLabel, cfg.KEKID, cfg.CreateKEK = label, ref.ID, false
	s2, err := hsm.Open(cfg)
	if err != nil {
		t.Fatalf("restore would stop: %v", err)
	}
	defer s2.Close()
	if err := backup.BindHSM(ctx, s2, f); err != nil {
		t.Fatalf("restore would stop: %v", err)
	}
	// Now restore also checks every KEK the secrets are under.
	keks := &backup.KEKs{BlobKEK: hsm.BlobKEK}
	if _, err := backup.Read(bytes.NewReader(buf.Bytes()), keks); err != nil {
		t.Fatal(err)
	}
	err = keks.CheckKEKs(s2.HasKEK)
	t.Logf("restore's KEK check: %v", err)
	if err == nil || !strings.Contains(err.Error(), old) || !strings.Contains(err.Error(), "zebra v1") {
		t.Errorf("kmsd restore accepts a backup holding a secret under the retired KEK %s: %v", old, err)
	}
}

// slowCommit is the HSM sealer whose Seal for key "slow" returns late: it
// stands for an HE keyset generation, which seals the seed first and then
// computes the keyset (kms/keyset.go: Seal, then GenerateKeyset, then the
// commit), minutes for large parameters.
type slowCommit struct {
	*hsm.Sealer
	sealed chan struct{}
	once   *sync.Once
}

func (s slowCommit) Seal(ctx context.Context, sc kms.SealContext, p kms.Secret) ([]byte, error) {
	b, err := s.Sealer.Seal(ctx, sc, p)
	if sc.Key == "slow" {
		first := false
		s.once.Do(func() { close(s.sealed); first = true })
		if first {
			time.Sleep(1500 * time.Millisecond)
		}
	}
	return b, err
}

// TestReviewRetireDuringGeneration: a version sealed under the primary
// before a rotation and committed after the rotation is done and the old
// KEK retired: retire counted what the store held, nothing fences the
// versions being made. The key is lost. One process, no replicas.
func TestReviewRetireDuringGeneration(t *testing.T) {
	ctx := context.Background()
	label := "review-gen-" + reviewID()[:8]
	cfg := testhsm.Config(t)
	cfg.KEKLabel = label
	hs, err := hsm.Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer hs.Close()
	old := hs.KEKID()
	sealer := slowCommit{Sealer: hs, sealed: make(chan struct{}), once: &sync.Once{}}
	st, err := bolt.Open(filepath.Join(t.TempDir(), "kms.db"), bolt.Options{Sealer: hs})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	st.PutMeta("sealed-under", []byte(`{"token":"kmsd-test","label":"`+label+`","id":"`+old+`"}`))
	a, err := New(ctx, Config{Store: st, AuditStore: st.Audit(), Sealer: sealer, AdminToken: func(string) error { return nil }})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	made := make(chan error, 1)
	go func() {
		_, _, err := a.Service.CreateKey(ctx, "slow", "ml-dsa-65", kms.Policy{})
		made <- err
	}()
	<-sealer.sealed
	// kmsctl kek rotate --wait; kmsctl kek retire OLD (the README's block).
	if _, err := a.RotateKEK(ctx, reviewAdmin); err != nil {
		t.Fatal(err)
	}
	if err := a.rewrapOnce(ctx, hs, st); err != nil {
		t.Fatal(err)
	}
	if _, err := a.RetireKEK(ctx, reviewAdmin, old); err != nil {
		t.Fatalf("retire: %v", err)
	}
	if err := <-made; err != nil {
		t.Fatalf("the key made during the rotation: %v", err)
	}
	if _, _, err := a.Service.Sign(ctx, "slow", []byte("m"), nil); err != nil {
		t.Errorf("key 'slow', committed after the retire, was sealed under the destroyed KEK %s: %v", old, err)
	}
}

// TestReviewKEKEndpointsOnlyAdminOverAll: rotate, retire and status over
// HTTP for tokens that are not an admin over "*".
func TestReviewKEKEndpointsOnlyAdminOverAll(t *testing.T) {
	ctx := context.Background()
	label := "review-az-" + reviewID()[:8]
	cfg := testhsm.Config(t)
	cfg.KEKLabel = label
	hs, err := hsm.Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer hs.Close()
	st, err := bolt.Open(filepath.Join(t.TempDir(), "kms.db"), bolt.Options{Sealer: hs})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	st.PutMeta("sealed-under", []byte(`{"token":"kmsd-test","label":"`+label+`","id":"`+hs.KEKID()+`"}`))
	var admin string
	a, err := New(ctx, Config{Store: st, AuditStore: st.Audit(), Sealer: hs, AdminToken: func(tok string) error { admin = tok; return nil }})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	srv, ca := testutil.TLSServer(t, a.Handler())
	tcfg, _ := client.TLSConfig(ca, "", "")
	as := func(tok string) *client.Client {
		c, err := client.New(srv.URL, tok, client.WithTLS(tcfg))
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	root := as(admin)
	toks := map[string]string{"no token": ""}
	for name, req := range map[string]client.CreateTokenRequest{
		"admin over team-*": {Role: "admin", Keys: []string{"team-*"}},
		"admin over **":     {Role: "admin", Keys: []string{"**"}},
		"worker over *":     {Role: "worker", Keys: []string{"*"}},
		"auditor over *":    {Role: "auditor", Keys: []string{"*"}},
		"decryptor over *":  {Role: "decryptor", Keys: []string{"*"}},
	} {
		tk, err := root.CreateToken(ctx, req)
		if err != nil {
			t.Logf("%s: %v", name, err)
			continue
		}
		toks[name] = tk.Token
	}
	primary := hs.KEKID()
	for name, tok := range toks {
		c := as(tok)
		if _, err := c.KEKStatus(ctx, true); client.StatusOf(err) != 401 && client.StatusOf(err) != 403 {
			t.Errorf("%s: status: %v", name, err)
		}
		if _, err := c.RotateKEK(ctx); client.StatusOf(err) != 401 && client.StatusOf(err) != 403 {
			t.Errorf("%s: rotate: %v", name, err)
		}
		if _, err := c.RetireKEK(ctx, primary); client.StatusOf(err) != 401 && client.StatusOf(err) != 403 {
			t.Errorf("%s: retire: %v", name, err)
		}
	}
	if p, _ := hs.KEKs(); p != primary {
		t.Fatalf("the primary changed: %s", p)
	}
}
