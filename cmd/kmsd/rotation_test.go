package main

import (
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/internal/testetcd"
	"github.com/kmsd-project/kmsd/internal/testmetrics"
	"github.com/kmsd-project/kmsd/kms"
)

// The scheduled-rotation tests run kmsd with a 2 s rotation_period, checked
// every second (the least kmsd takes).
const (
	testPeriod = 2 * time.Second
	testCheck  = time.Second
)

var rotationFlags = []string{"--min-rotation-period", "1s", "--rotation-check-interval", "1s", "--audit-checkpoint-interval", "200ms", "--insecure-http"}

// versionsOf returns every version of a key, oldest first.
func versionsOf(t *testing.T, c *client.Client, name string) []client.Version {
	t.Helper()
	var all []client.Version
	for page := ""; ; {
		l, err := c.ListVersions(ctx, name, 1000, page)
		if err != nil {
			t.Fatal(err)
		}
		all = append(all, l.Versions...)
		if page = l.NextPageToken; page == "" {
			break
		}
	}
	for i, j := 0, len(all)-1; i < j; i, j = i+1, j-1 {
		all[i], all[j] = all[j], all[i]
	}
	return all
}

// checkSchedule fails unless the versions are 1..n without a gap, each
// made at least a period after the one before (no rotation twice), the
// last one primary.
func checkSchedule(t *testing.T, vs []client.Version) {
	t.Helper()
	for i, v := range vs {
		if v.Version != uint64(i+1) {
			t.Fatalf("version %d at place %d: a gap or a repeat", v.Version, i+1)
		}
		if i > 0 {
			if gap := v.CreatedAt.Sub(vs[i-1].CreatedAt); gap < testPeriod {
				t.Fatalf("version %d made %v after version %d, less than the period %v: rotated twice", v.Version, gap, v.Version-1, testPeriod)
			}
		}
	}
	if !vs[len(vs)-1].Primary {
		t.Fatalf("the latest version %d is not primary", len(vs))
	}
}

// expectedRange is how many versions a key made at created has at now: one,
// plus a rotation every period and at most one check interval and a
// rotation's time more (bounded by 500 ms here).
func expectedRange(created, now time.Time) (lo, hi int) {
	t := now.Sub(created)
	return 1 + int(t/(testPeriod+testCheck+500*time.Millisecond)), 1 + int(t/testPeriod)
}

// checkAudited fails unless the verified log holds exactly one
// scheduled-rotation record, by the service itself, for each version
// above 1, and none for any other; it waits up to 10 s for a checkpoint
// that covers them.
func checkAudited(t *testing.T, admin *client.Client, name string, latest uint64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, recs := verifyLog(t, admin)
		seen := map[uint64]int{}
		for _, r := range recs {
			if r.Operation == kms.ScheduledRotationOp && r.Key == name {
				if r.Actor != "system" || r.Status != 200 {
					t.Fatalf("scheduled rotation record %+v", r)
				}
				seen[r.Version]++
			}
		}
		complete := len(seen) == int(latest-1)
		for n, c := range seen {
			if c != 1 || n < 2 || n > latest {
				t.Fatalf("version %d has %d scheduled-rotation records (latest %d)", n, c, latest)
			}
		}
		if complete {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the verified log has scheduled-rotation records for %d versions, want %d", len(seen), latest-1)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// TestScheduledRotationOnBolt: kmsd on bbolt rotates a key with a 2 s
// period the expected number of times and no version twice; a key without
// a period is left alone; after kill -9 and 5 s down (two periods missed)
// the key rotates once at start, not once per missed period; every
// rotation is audited once, and the log verifies.
func TestScheduledRotationOnBolt(t *testing.T) {
	dir := t.TempDir()
	p := startEnv(t, dir, nil, rotationFlags...)
	p.waitReady(t)
	admin := adminClient(t, p, dir)
	k, err := admin.CreateKey(ctx, client.CreateKeyRequest{Name: "r", Kind: "ml-dsa-65", Policy: &client.Policy{RotationPeriod: "2s"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := admin.CreateKey(ctx, client.CreateKeyRequest{Name: "still", Kind: "ml-kem-768"}); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.CreateKey(ctx, client.CreateKeyRequest{Name: "fast", Kind: "ml-kem-768", Policy: &client.Policy{RotationPeriod: "500ms"}}); client.StatusOf(err) != 400 {
		t.Fatalf("a period below --min-rotation-period: %v", err)
	}
	created := k.Versions[0].CreatedAt

	time.Sleep(5 * time.Second)
	vs := versionsOf(t, admin, "r")
	lo, hi := expectedRange(created, time.Now())
	if len(vs) < lo || len(vs) > hi {
		t.Fatalf("after %v: %d versions, want %d to %d", time.Since(created).Round(time.Millisecond), len(vs), lo, hi)
	}
	checkSchedule(t, vs)
	got, err := admin.GetKey(ctx, "r")
	if err != nil || got.NextRotationTime == nil || !got.NextRotationTime.Equal(vs[len(vs)-1].CreatedAt.Add(testPeriod)) {
		t.Fatalf("next_rotation_time %v, want the latest version's creation + 2s (%v): %v", got.NextRotationTime, vs[len(vs)-1].CreatedAt, err)
	}

	// Down for five seconds: two periods and a half missed.
	killed := time.Now()
	p.cmd.Process.Kill()
	p.wait(t, 10*time.Second)
	time.Sleep(5 * time.Second)
	restarted := time.Now()
	maddr := freeAddr(t)
	p = startEnv(t, dir, nil, append([]string{"--metrics-addr", maddr}, rotationFlags...)...)
	p.waitReady(t)
	ready := time.Now()
	admin = adminClient(t, p, dir)
	time.Sleep(3 * time.Second)
	vs = versionsOf(t, admin, "r")
	checkSchedule(t, vs)
	var after []client.Version
	for _, v := range vs {
		switch {
		case v.CreatedAt.After(killed) && v.CreatedAt.Before(restarted):
			t.Fatalf("version %d made while kmsd was down", v.Version)
		case !v.CreatedAt.Before(restarted):
			after = append(after, v)
		}
	}
	if len(after) == 0 {
		t.Fatal("no rotation after the restart")
	}
	catchUp := after[0]
	if catchUp.CreatedAt.After(ready.Add(time.Second)) {
		t.Fatalf("the catch-up rotation came %v after kmsd was ready, want at its first check", catchUp.CreatedAt.Sub(ready))
	}
	if lo, hi := expectedRange(catchUp.CreatedAt, time.Now()); len(after) < lo || len(after) > hi {
		t.Fatalf("%d versions since the restart, want %d to %d: the missed periods were made up once", len(after), lo, hi)
	}
	if s := versionsOf(t, admin, "still"); len(s) != 1 {
		t.Fatalf("a key without a period has %d versions", len(s))
	}
	// The metrics count this process's scheduled rotations (a rotation
	// may come between the listing and the scrape), none overdue.
	m := testmetrics.Get(t, http.DefaultClient, "http://"+maddr+"/metrics", "")
	if n := m.Must(t, "kmsd_scheduled_rotations_total", "outcome", "ok"); n < float64(len(after)) || n > float64(len(after)+1) {
		t.Errorf("kmsd_scheduled_rotations_total{outcome=ok} = %v, want %d (or one more)", n, len(after))
	}
	for _, g := range []struct {
		name   string
		labels []string
		want   float64
	}{{"kmsd_scheduled_rotations_total", []string{"outcome", "error"}, 0}, {"kmsd_rotation_overdue_keys", nil, 0}, {"kmsd_rotation_scan_failures_total", nil, 0}, {"kmsd_leader", []string{"role", "rotation"}, 1}} {
		if v := m.Must(t, g.name, g.labels...); v != g.want {
			t.Errorf("%s%v = %v, want %v", g.name, g.labels, v, g.want)
		}
	}
	if ts := m.Must(t, "kmsd_rotation_last_scan_timestamp_seconds"); time.Since(time.Unix(int64(ts), 0)) > 5*time.Second {
		t.Errorf("the last scan was at %v", time.Unix(int64(ts), 0))
	}
	checkAudited(t, admin, "r", uint64(len(vs)))
	t.Logf("%d versions, made every %v or more; one catch-up after 5 s down", len(vs), testPeriod)
}

// rotationLeader returns the index of the replica whose log says it leads
// "rotation" last among those alive, or -1.
func rotationLeader(ps []*proc, alive func(i int) bool) int {
	for i, p := range ps {
		if alive(i) && strings.Contains(p.stderr.String(), `"msg":"leader","role":"rotation"`) {
			return i
		}
	}
	return -1
}

// TestScheduledRotationOnThreeReplicas: three kmsd on a three-member etcd
// cluster, a key with a 2 s period: exactly one replica rotates it (the
// versions come a period apart, none twice, each audited once); the
// rotation leader is killed with SIGKILL around a due time, another
// replica takes over within the election's lease, every version
// acknowledged before the kill is there afterwards, the versions go on
// without a gap or a repeat, and the audit log verifies.
func TestScheduledRotationOnThreeReplicas(t *testing.T) {
	c := testetcd.Start(t, 3)
	dirs := []string{t.TempDir(), t.TempDir(), t.TempDir()}
	extra := []string{"--min-rotation-period", "1s", "--rotation-check-interval", testCheck.String()}
	ps := []*proc{startReplica(t, c, nil, dirs[0], "", extra...)}
	ps[0].waitReady(t)
	for _, d := range dirs[1:] { // one at a time: see TestThreeReplicasOnEtcd
		ps = append(ps, startReplica(t, c, nil, d, dirs[0], extra...))
		ps[len(ps)-1].waitReady(t)
	}
	admins := make([]*client.Client, 3)
	for i, p := range ps {
		admins[i] = adminClient(t, p, dirs[0])
	}
	k, err := admins[1].CreateKey(ctx, client.CreateKeyRequest{Name: "r", Kind: "ml-dsa-65", Policy: &client.Policy{RotationPeriod: "2s"}})
	if err != nil {
		t.Fatal(err)
	}
	created := k.Versions[0].CreatedAt
	time.Sleep(5 * time.Second)
	dead := -1
	alive := func(i int) bool { return i != dead }
	leader := rotationLeader(ps, alive)
	if leader < 0 {
		t.Fatal("no replica says it leads rotation")
	}
	other := (leader + 1) % 3
	vs := versionsOf(t, admins[other], "r")
	if lo, hi := expectedRange(created, time.Now()); len(vs) < lo || len(vs) > hi {
		t.Fatalf("after %v: %d versions, want %d to %d", time.Since(created).Round(time.Millisecond), len(vs), lo, hi)
	}
	checkSchedule(t, vs)

	// Kill the leader just after a rotation comes due (the check runs
	// every second: mid-way through it or about to start it).
	got, err := admins[other].GetKey(ctx, "r")
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Until(got.NextRotationTime.Add(100 * time.Millisecond)))
	ps[leader].cmd.Process.Kill()
	killed := time.Now()
	dead = leader
	acked := versionsOf(t, admins[other], "r") // what had committed by the kill, or just after
	// Another replica leads within the lease (5 s), and rotates: wait for
	// two rotations after the kill (15 s at most).
	var after []client.Version
	for {
		vs = versionsOf(t, admins[other], "r")
		after = after[:0]
		for _, v := range vs {
			if v.CreatedAt.After(killed.Add(time.Second)) {
				after = append(after, v)
			}
		}
		if len(after) >= 2 {
			break
		}
		if time.Since(killed) > 15*time.Second {
			t.Fatalf("%d rotations in the 15 s after the leader was killed, want 2", len(after))
		}
		time.Sleep(200 * time.Millisecond)
	}
	next := rotationLeader(ps, alive)
	if next < 0 {
		t.Fatal("versions were made, but no live replica says it leads rotation")
	}
	checkSchedule(t, vs)
	for _, a := range acked {
		if v := vs[a.Version-1]; !v.CreatedAt.Equal(a.CreatedAt) {
			t.Fatalf("version %d changed after the kill: made %v, then %v", a.Version, a.CreatedAt, v.CreatedAt)
		}
	}
	time.Sleep(testPeriod) // one more period under the new leader
	vs = versionsOf(t, admins[other], "r")
	checkSchedule(t, vs)
	after = after[:0]
	for _, v := range vs {
		if v.CreatedAt.After(killed.Add(time.Second)) {
			after = append(after, v)
		}
	}
	if lo, hi := expectedRange(after[0].CreatedAt, time.Now()); len(after) < lo || len(after) > hi {
		t.Fatalf("%d versions since the new leader's first, want %d to %d", len(after), lo, hi)
	}
	checkAudited(t, admins[other], "r", uint64(len(vs)))
	t.Logf("%d versions; replica %d led, was killed; replica %d took over, first rotation %v after the kill", len(vs), leader, next, after[0].CreatedAt.Sub(killed).Round(time.Millisecond))
}

// TestRotationFlagsAtLeastASecond: --rotation-check-interval and
// --min-rotation-period below 1s (flag or environment) are refused with a
// line that names the flag, before anything is made.
func TestRotationFlagsAtLeastASecond(t *testing.T) {
	noEnv := func(string) string { return "" }
	for _, c := range []struct {
		args []string
		env  map[string]string
		want string
	}{
		{[]string{"--rotation-check-interval", "1ns"}, nil, "--rotation-check-interval 1ns is below the minimum of 1s"},
		{[]string{"--rotation-check-interval", "999ms"}, nil, "--rotation-check-interval"},
		{nil, map[string]string{"KMS_ROTATION_CHECK_INTERVAL": "10ms"}, "--rotation-check-interval 10ms"},
		{[]string{"--min-rotation-period", "500ms"}, nil, "--min-rotation-period 500ms is below the minimum of 1s"},
		{nil, map[string]string{"KMS_MIN_ROTATION_PERIOD": "1us"}, "--min-rotation-period"},
	} {
		env := noEnv
		if c.env != nil {
			env = func(k string) string { return c.env[k] }
		}
		if _, err := parseFlags(c.args, env); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%v %v: %v, want an error saying %q", c.args, c.env, err, c.want)
		}
	}
	if _, err := parseFlags([]string{"--rotation-check-interval", "1s", "--min-rotation-period", "1s"}, noEnv); err != nil {
		t.Errorf("1s: %v", err)
	}
	dir := filepath.Join(t.TempDir(), "data")
	exitsWith(t, dir, "--rotation-check-interval 1ns is below the minimum of 1s", "--rotation-check-interval", "1ns")
	if _, err := os.Stat(dir); err == nil {
		t.Error("the data dir was made before the setting was checked")
	}
}
