package etcd_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/kmsd-project/kmsd/internal/testetcd"
	"github.com/kmsd-project/kmsd/internal/testhsm"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/store/etcd"
	"github.com/kmsd-project/kmsd/store/storetest"
)

var ctx = context.Background()

func rec(op string) *kms.AuditRecord {
	return &kms.AuditRecord{Time: "2026-01-01T00:00:00Z", Actor: "t", Operation: op, Status: 200}
}

// replicas opens n stores on one prefix of cluster c, each with its own
// client of every member (as kmsd replicas are).
func replicas(t *testing.T, c *testetcd.Cluster, n int) []*etcd.Store {
	return replicasOn(t, c, newPrefix(t), n)
}

func replicasOn(t *testing.T, c *testetcd.Cluster, prefix string, n int) []*etcd.Store {
	var out []*etcd.Store
	for range n {
		cli, err := clientv3.New(etcd.ClientConfig(c.Endpoints(), nil))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cli.Close() })
		s, err := etcd.Open(ctx, cli, etcd.Options{Prefix: prefix, Sealer: testhsm.Open(t)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		out = append(out, s)
	}
	return out
}

// rotate adds version Latest+1 as the primary, with its audit record.
func rotate(s *etcd.Store, name, op string) (uint64, error) {
	var n uint64
	err := s.UpdateKey(ctx, name, func(tx kms.KeyTx) ([]*kms.AuditRecord, error) {
		k := tx.Key()
		n = k.Latest + 1
		if err := tx.AddVersion(&kms.Version{Number: n, State: kms.StateEnabled, Sealed: []byte(op)}); err != nil {
			return nil, err
		}
		k.Primary = n
		return []*kms.AuditRecord{rec(op)}, nil
	})
	return n, err
}

// TestReplicasSerializeInEtcd: three replicas of one prefix on a
// three-member cluster rotate one key and append records at once. Every
// rotation succeeds with a version of its own, none lost; the audit log
// is one log with every record, in a valid tree.
func TestReplicasSerializeInEtcd(t *testing.T) {
	c := testetcd.Start(t, 3)
	rs := replicas(t, c, 3)
	if err := rs[0].CreateKey(ctx, &kms.Key{Name: "k", Kind: "ml-dsa-65", Primary: 1, Latest: 1}, &kms.Version{Number: 1, State: kms.StateEnabled}, []*kms.AuditRecord{rec("create")}); err != nil {
		t.Fatal(err)
	}
	const perReplica = 8
	var wg sync.WaitGroup
	got := make(chan uint64, 3*perReplica)
	for i, r := range rs {
		for j := range perReplica {
			wg.Add(2)
			go func() {
				defer wg.Done()
				n, err := rotate(r, "k", fmt.Sprintf("rotate-%d-%d", i, j))
				if err != nil {
					t.Error(err)
					return
				}
				got <- n
			}()
			go func() {
				defer wg.Done()
				if err := r.Audit().AppendAudit(ctx, rec(fmt.Sprintf("read-%d-%d", i, j))); err != nil {
					t.Error(err)
				}
			}()
		}
	}
	wg.Wait()
	close(got)
	seen := map[uint64]bool{}
	for n := range got {
		if seen[n] {
			t.Fatalf("version %d given to two rotations", n)
		}
		seen[n] = true
	}
	k, err := rs[2].GetKey(ctx, "k")
	if err != nil || k.Latest != 1+3*perReplica || len(seen) != 3*perReplica {
		t.Fatalf("key after %d rotations: %+v %v (%d distinct)", 3*perReplica, k, err, len(seen))
	}
	for n := uint64(1); n <= k.Latest; n++ {
		if _, err := rs[1].GetVersion(ctx, "k", n); err != nil {
			t.Fatal(err)
		}
	}
	ops := storetest.CheckLog(t, rs[1].Audit())
	if len(ops) != 1+6*perReplica {
		t.Fatalf("%d records, want %d", len(ops), 1+6*perReplica)
	}
	distinct := map[string]bool{}
	for _, op := range ops {
		distinct[op] = true
	}
	if len(distinct) != len(ops) {
		t.Fatal("a record is in the log twice")
	}
	var conflicts, rounds uint64
	for _, r := range rs {
		conflicts += r.Audit().Conflicts()
		rounds += r.SealRounds()
	}
	t.Logf("%d seal transactions, %d lost to another replica's seal", rounds, conflicts)
}

// TestWatchReachesOtherReplicas: a change committed on one replica reaches
// another's watchers within the stated bound, and a replica whose etcd
// stops answering tells its watchers to drop everything within it.
func TestWatchReachesOtherReplicas(t *testing.T) {
	c := testetcd.Start(t, 1)
	rs := replicas(t, c, 2)
	changes := make(chan kms.Change, 64)
	rs[1].Watch(func(chs []kms.Change) {
		for _, ch := range chs {
			changes <- ch
		}
	})
	if err := rs[0].CreateToken(ctx, &kms.Token{ID: "tok1", Role: kms.RoleAdmin}, nil); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	wait := func(want func(kms.Change) bool, what string, within time.Duration) {
		t.Helper()
		deadline := time.After(within)
		for {
			select {
			case ch := <-changes:
				if want(ch) {
					t.Logf("%s after %v", what, time.Since(start).Round(time.Millisecond))
					return
				}
			case <-deadline:
				t.Fatalf("%s not seen within %v", what, within)
			}
		}
	}
	wait(func(ch kms.Change) bool { return ch.Token == "tok1" }, "another replica's token change", etcd.Bound())
	if err := rs[0].UpdateToken(ctx, "tok1", func(tk *kms.Token) ([]*kms.AuditRecord, error) {
		now := time.Now()
		tk.RevokedAt = &now
		return nil, nil
	}); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	wait(func(ch kms.Change) bool { return ch.Token == "tok1" }, "another replica's revocation", etcd.Bound())
	if !rs[1].FreshWithin(etcd.Bound()) {
		t.Fatal("a replica hearing from etcd is not fresh")
	}
	c.Kill(0)
	start = time.Now()
	// Within the bound the replica stops counting itself fresh (its
	// caches are read past), and later drops everything.
	deadline := time.Now().Add(etcd.Bound() + etcd.HeartbeatInterval + 500*time.Millisecond)
	for rs[1].FreshWithin(etcd.Bound()) {
		if time.Now().After(deadline) {
			t.Fatalf("still fresh %v after etcd was killed", time.Since(start))
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("not fresh after %v", time.Since(start).Round(time.Millisecond))
	wait(func(ch kms.Change) bool { return ch.All }, "drop everything after etcd went silent", etcd.StaleAfter+etcd.ProgressInterval+time.Second)
	if rs[1].Resets() == 0 {
		t.Fatal("no reset counted")
	}
}

// TestMemberKilledUnderLoad: while three replicas rotate and append, one
// etcd member is killed with SIGKILL and restarted. Every rotation and
// record acknowledged is in etcd afterwards, once; the log has no gap and
// its tree is valid.
func TestMemberKilledUnderLoad(t *testing.T) {
	c := testetcd.Start(t, 3)
	rs := replicas(t, c, 3)
	if err := rs[0].CreateKey(ctx, &kms.Key{Name: "k", Kind: "ml-dsa-65", Primary: 1, Latest: 1}, &kms.Version{Number: 1, State: kms.StateEnabled}, []*kms.AuditRecord{rec("create")}); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	acked := map[string]bool{"create": true}
	versions := map[uint64]string{}
	var failed int
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i, r := range rs {
		for g := range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for j := 0; ; j++ {
					select {
					case <-stop:
						return
					default:
					}
					op := fmt.Sprintf("op-%d-%d-%d", i, g, j)
					var err error
					var n uint64
					if g == 0 {
						n, err = rotate(r, "k", op)
					} else {
						err = r.Audit().AppendAudit(ctx, rec(op))
					}
					mu.Lock()
					if err != nil {
						failed++
					} else {
						acked[op] = true
						if g == 0 {
							versions[n] = op
						}
					}
					mu.Unlock()
				}
			}()
		}
	}
	time.Sleep(time.Second)
	c.Kill(0)
	time.Sleep(2 * time.Second)
	c.Restart(0)
	time.Sleep(time.Second)
	close(stop)
	wg.Wait()
	c.WaitHealthy()
	ops := storetest.CheckLog(t, rs[2].Audit())
	inLog := map[string]bool{}
	for _, op := range ops {
		if inLog[op] {
			t.Fatalf("%s is in the log twice", op)
		}
		inLog[op] = true
	}
	for op := range acked {
		if !inLog[op] {
			t.Fatalf("acknowledged record %s is not in the log", op)
		}
	}
	for n, op := range versions {
		v, err := rs[1].GetVersion(ctx, "k", n)
		if err != nil || string(v.Sealed) != op {
			t.Fatalf("acknowledged version %d (%s): %+v %v", n, op, v, err)
		}
	}
	t.Logf("%d records acknowledged, %d in the log, %d versions, %d requests failed while the member was down", len(acked), len(ops), len(versions), failed)
	if len(versions) < 3 || len(acked) < 50 {
		t.Fatalf("too little load: %d versions, %d records", len(versions), len(acked))
	}
}

// TestSlowReplicaAmongBusyOnes: one replica appends one record at a time
// while two others append from 12 goroutines each, as fast as they can.
// Every append commits, none refused (an append does not race the others
// for the log's end: it was refused after 100 lost races before pending
// groups, or waited for a turn); the log holds every record once, and the
// slow replica's records in the order it appended them.
func TestSlowReplicaAmongBusyOnes(t *testing.T) {
	c := testetcd.Start(t, 1)
	rs := replicas(t, c, 3)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var busyErrs sync.Map
	var busy atomic.Int64
	for _, r := range rs[1:] {
		for g := range 12 {
			wg.Go(func() {
				for i := 0; ; i++ {
					select {
					case <-stop:
						return
					default:
					}
					if err := r.Audit().AppendAudit(ctx, rec(fmt.Sprintf("busy-%p-%d-%d", r, g, i))); err != nil {
						busyErrs.Store(err.Error(), true)
					} else {
						busy.Add(1)
					}
				}
			})
		}
	}
	for i := range 40 {
		if err := rs[0].Audit().AppendAudit(ctx, rec(fmt.Sprintf("slow-%d", i))); err != nil {
			close(stop)
			wg.Wait()
			t.Fatalf("the slow replica's append %d: %v", i, err)
		}
	}
	close(stop)
	wg.Wait()
	busyErrs.Range(func(k, _ any) bool { t.Errorf("a busy replica's append: %v", k); return true })
	ops := storetest.CheckLog(t, rs[0].Audit())
	distinct := map[string]bool{}
	var slow []string
	for _, op := range ops {
		distinct[op] = true
		if strings.HasPrefix(op, "slow-") {
			slow = append(slow, op)
		}
	}
	if len(distinct) != len(ops) || int64(len(ops)) != 40+busy.Load() {
		t.Fatalf("%d records, %d distinct, want %d", len(ops), len(distinct), 40+busy.Load())
	}
	for i, op := range slow {
		if op != fmt.Sprintf("slow-%d", i) {
			t.Fatalf("the slow replica's records out of order: %v", slow)
		}
	}
	t.Logf("%d records; seal transactions: %d, %d and %d", len(ops), rs[0].SealRounds(), rs[1].SealRounds(), rs[2].SealRounds())
}

// TestLogFollowsCommitOrder: records acknowledged one after another, each
// on another replica than the last, are in the log in that order, and a
// read on any replica (leader or not) sees every record acknowledged
// before it, at once.
func TestLogFollowsCommitOrder(t *testing.T) {
	c := testetcd.Start(t, 3)
	rs := replicas(t, c, 3)
	for i := range 30 {
		r := rs[(i*7)%3]
		if i%2 == 0 {
			if err := r.Audit().AppendAudit(ctx, rec(fmt.Sprintf("op-%02d", i))); err != nil {
				t.Fatal(err)
			}
		} else if err := r.CreateKey(ctx, &kms.Key{Name: fmt.Sprintf("k%d", i), Kind: "ml-dsa-65", Primary: 1, Latest: 1}, &kms.Version{Number: 1, State: kms.StateEnabled},
			[]*kms.AuditRecord{rec(fmt.Sprintf("op-%02d", i))}); err != nil {
			t.Fatal(err)
		}
		reader := rs[(i+1)%3].Audit()
		if n, err := reader.AuditSize(ctx); err != nil || n != uint64(i+1) {
			t.Fatalf("after %d acknowledged records, a read on another replica finds %d (%v)", i+1, n, err)
		}
	}
	ops := storetest.CheckLog(t, rs[2].Audit())
	for i, op := range ops {
		if op != fmt.Sprintf("op-%02d", i) {
			t.Fatalf("log %v, want op-00 ... op-29 in order", ops)
		}
	}
}

// TestPendingSealedByTheNextLeader: groups a replica made durable and
// died before any sealed them (written here as that replica would have)
// are sealed by the next replica to lead, without any read asking for it,
// in the order they committed (not the order of their keys).
func TestPendingSealedByTheNextLeader(t *testing.T) {
	c := testetcd.Start(t, 1)
	prefix := newPrefix(t)
	cli, err := clientv3.New(etcd.ClientConfig(c.Endpoints(), nil))
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	// A writer that died with ten groups pending (named so that their
	// keys sort against their commit order).
	dead := replicasOn(t, c, prefix, 1)[0]
	dead.StopSealing()
	for i := range 10 {
		if err := dead.PutPendingForTest(ctx, fmt.Sprintf("a/q/dead/%016x", 100-i), []*kms.AuditRecord{rec(fmt.Sprintf("op-%d", i))}); err != nil {
			t.Fatal(err)
		}
	}
	dead.Close()
	s := replicasOn(t, c, prefix, 1)[0]
	deadline := time.Now().Add(3 * etcd.LeaseTTL * time.Second)
	for {
		n, err := s.Pending(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d groups still pending after %v", n, 3*etcd.LeaseTTL*time.Second)
		}
		time.Sleep(50 * time.Millisecond)
	}
	// After a read of the log: it waits for a seal in progress, which
	// counts its round after its transaction (seen by Pending) commits.
	ops := storetest.CheckLog(t, s.Audit())
	if s.SealRounds() == 0 {
		t.Fatal("the leader sealed nothing")
	}
	for i, op := range ops {
		if op != fmt.Sprintf("op-%d", i) {
			t.Fatalf("log %v, want op-0 ... op-9 in commit order", ops)
		}
	}
	if len(ops) != 10 {
		t.Fatalf("%d records, want 10", len(ops))
	}
}

// TestLeadEndsWithEtcdGone: a replica waiting for its turn to lead returns
// from Lead once its context ends, even with etcd gone. (The election's
// own clean-up waits on etcd without a timeout: kmsd on SIGTERM hung there
// for good when its etcd had been stopped first.)
func TestLeadEndsWithEtcdGone(t *testing.T) {
	c := testetcd.Start(t, 1)
	rs := replicas(t, c, 2)
	leading := make(chan struct{})
	go rs[0].Lead(ctx, "test", func(ctx context.Context) { close(leading); <-ctx.Done() })
	<-leading
	lctx, cancel := context.WithCancel(ctx)
	ended := make(chan struct{})
	go func() {
		rs[1].Lead(lctx, "test", func(context.Context) { t.Error("two leaders at once") })
		close(ended)
	}()
	time.Sleep(500 * time.Millisecond) // campaigning: waiting for the leader to go
	c.Kill(0)
	cancel()
	select {
	case <-ended:
	case <-time.After(10 * time.Second):
		t.Fatal("Lead still running 10 s after its context ended, etcd gone")
	}
}

// TestCommitOutlivesItsCaller: a caller whose context ends while its
// transaction is on its way (a client that went away mid-request) does not
// abandon it: the change and its record commit and the call says so,
// instead of reporting a failure for a transaction that may commit anyway.
func TestCommitOutlivesItsCaller(t *testing.T) {
	s := replicas(t, testetcd.Start(t, 1), 1)[0]
	cctx, cancel := context.WithCancel(ctx)
	etcd.SetBeforeCommit(t, cancel)
	r := rec("create")
	err := s.CreateKey(cctx, &kms.Key{Name: "k", Kind: "ml-dsa-65", Primary: 1, Latest: 1}, &kms.Version{Number: 1, State: kms.StateEnabled}, []*kms.AuditRecord{r})
	if err != nil || !r.Committed {
		t.Fatalf("create whose caller went away as it committed: %v (record committed: %v)", err, r.Committed)
	}
	etcd.SetBeforeCommit(t, nil)
	if _, err := s.GetKey(ctx, "k"); err != nil {
		t.Fatal(err)
	}
	if ops := storetest.CheckLog(t, s.Audit()); len(ops) != 1 || ops[0] != "create" {
		t.Fatalf("log %v, want the create", ops)
	}
	// A caller gone before the transaction is even built changes nothing.
	if err := s.CreateKey(cctx, &kms.Key{Name: "k2", Kind: "ml-dsa-65", Primary: 1, Latest: 1}, &kms.Version{Number: 1, State: kms.StateEnabled}, []*kms.AuditRecord{rec("create2")}); err == nil {
		t.Fatal("a create whose caller had gone before it started committed")
	}
	if _, err := s.GetKey(ctx, "k2"); err == nil {
		t.Fatal("k2 exists")
	}
}
