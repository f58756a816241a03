package app

import (
	"context"
	"errors"
	"io"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/he"
	"github.com/kmsd-project/kmsd/internal/testhsm"
	"github.com/kmsd-project/kmsd/store/bolt"
)

func TestMain(m *testing.M) { testhsm.Main(m) }

// TestSetupErrorsAreMessages: a missing part is an error naming it, never
// a nil-pointer panic; a wired app starts and closes cleanly (twice over).
func TestSetupErrorsAreMessages(t *testing.T) {
	st, err := bolt.Open(filepath.Join(t.TempDir(), "kms.db"), bolt.Options{Sealer: testhsm.Open(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	sealer := testhsm.Open(t)
	for _, c := range []struct {
		cfg  Config
		want string
	}{
		{Config{Sealer: sealer, AuditStore: st.Audit()}, "a store and a sealer are required"},
		{Config{Store: st, AuditStore: st.Audit()}, "a store and a sealer are required"},
		{Config{Store: st, Sealer: sealer}, "an audit store is required"},
	} {
		if _, err := New(context.Background(), c.cfg); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: %v, want %q", c.cfg, err, c.want)
		}
	}
	var admin string
	a, err := New(context.Background(), Config{Store: st, AuditStore: st.Audit(), Sealer: sealer, BlobDir: filepath.Join(t.TempDir(), "blobs"),
		AdminToken: func(tok string) error { admin = tok; return nil }})
	if err != nil {
		t.Fatal(err)
	}
	if !a.AdminTokenMade || !strings.HasPrefix(admin, "kms_") || len(a.Identity) == 0 || a.Audit == nil || a.Blobs == nil || a.Handler() == nil {
		t.Fatalf("wired app: %+v", a)
	}
	a.Start()
	a.Start()
	a.Close()
	a.Close()
	// A second start on the same store makes no second admin token.
	b, err := New(context.Background(), Config{Store: st, AuditStore: st.Audit(), Sealer: sealer, AdminToken: func(string) error { t.Fatal("a second admin token"); return nil }})
	if err != nil || b.AdminTokenMade || b.Blobs != nil {
		t.Fatalf("second start: %+v %v", b, err)
	}
	b.Close()
}

// TestTokenUseFlushedWithoutLeading: a replica that never leads (another
// destroys due versions) still writes down the uses of the tokens it saw.
func TestTokenUseFlushedWithoutLeading(t *testing.T) {
	st, err := bolt.Open(filepath.Join(t.TempDir(), "kms.db"), bolt.Options{Sealer: testhsm.Open(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	var admin string
	led := make(chan string, 4)
	a, err := New(context.Background(), Config{Store: st, AuditStore: st.Audit(), Sealer: testhsm.Open(t), DestroyInterval: 20 * time.Millisecond,
		AdminToken: func(tok string) error { admin = tok; return nil },
		Lead:       func(ctx context.Context, role string, _ func(context.Context)) { led <- role; <-ctx.Done() }})
	if err != nil {
		t.Fatal(err)
	}
	a.Start()
	defer a.Close()
	p, err := a.Service.Authenticate(context.Background(), admin)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		tok, err := st.GetToken(context.Background(), p.TokenID)
		if err != nil {
			t.Fatal(err)
		}
		if tok.LastUsedAt != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("a replica that does not lead never wrote down its token uses")
		}
		time.Sleep(20 * time.Millisecond)
	}
	roles := map[string]bool{<-led: true, <-led: true, <-led: true, <-led: true}
	if !roles["checkpoints"] || !roles["destruction"] || !roles["rotation"] || !roles["kek"] {
		t.Fatalf("roles campaigned for: %v", roles)
	}
}

// TestSharedBlobOrphansWaitTheirGrace: with blobs that replicas share
// (OrphanGrace > 0), an orphan younger than the grace survives the start,
// since another replica may still be generating its keyset; the "blobs"
// leader removes it once it is older.
func TestSharedBlobOrphansWaitTheirGrace(t *testing.T) {
	st, err := bolt.Open(filepath.Join(t.TempDir(), "kms.db"), bolt.Options{Sealer: testhsm.Open(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	blobs, err := he.OpenDirBlobs(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	orphan, _, err := he.Put(ctx, blobs, func(w io.Writer) error { _, err := io.WriteString(w, "another replica's generation"); return err })
	if err != nil {
		t.Fatal(err)
	}
	led := make(chan string, 8)
	a, err := New(ctx, Config{Store: st, AuditStore: st.Audit(), Sealer: testhsm.Open(t), Blobs: blobs, OrphanGrace: 500 * time.Millisecond,
		Lead: func(ctx context.Context, role string, work func(context.Context)) { led <- role; work(ctx) }})
	if err != nil {
		t.Fatal(err)
	}
	if a.OrphansRemoved != 0 {
		t.Fatalf("a young orphan was removed at start (%d)", a.OrphansRemoved)
	}
	a.Start()
	defer a.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		r, err := blobs.Open(ctx, orphan)
		if errors.Is(err, he.ErrBlobNotFound) {
			break
		}
		if err == nil {
			r.Close()
		}
		if time.Now().After(deadline) {
			t.Fatal("the orphan outlived its grace by 10 s")
		}
		time.Sleep(50 * time.Millisecond)
	}
	roles := map[string]bool{}
	for len(led) > 0 {
		roles[<-led] = true
	}
	if !roles["blobs"] {
		t.Fatalf("the sweep ran outside the blobs leader (roles led: %v)", roles)
	}
}
