-- decide(): any batch (several quotas per request, any algorithm), all or nothing per request.
-- Hits arrive as parallel arrays, the hits of one request contiguous (same p_req). Rows are
-- locked (created if missing) in key order by one upsert, decided in memory in request
-- order, and written back by one UPDATE. The arithmetic repeats the reference functions
-- (fineflow._ratelimit.algorithms) exactly, in integer nanoseconds. A row is decided no
-- earlier than its last decision (``seen``) when the database clock decides: the clock is
-- read before the upsert waits for the rows.
CREATE OR REPLACE FUNCTION {schema}.decide(
    p_alg text, p_now bigint[], p_req int[], p_key text[], p_endpoint text[],
    p_policy text[], p_tier text[], p_lim bigint[], p_period bigint[], p_cap bigint[],
    p_cost bigint[]
) RETURNS TABLE (ok boolean, remaining bigint, reset_ns bigint, retry_ns bigint,
                 now_ns bigint)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    n int := coalesce(array_length(p_key, 1), 0);
    clock bigint := (extract(epoch from clock_timestamp()) * 1000000000)::bigint;
    slot int[];
    s_key text[]; s_ep text[]; s_pol text[]; s_alg text[];
    s_t bigint[]; s_count bigint[]; s_prev bigint[]; s_da bigint[]; s_dd bigint[];
    s_tier text[]; s_lim bigint[]; s_period bigint[]; s_cap bigint[]; s_ok boolean[];
    s_seen bigint[]; s_seen0 bigint[];
    o_ok boolean[]; o_rem bigint[]; o_reset bigint[]; o_retry bigint[]; o_now bigint[];
    n_t bigint[]; n_count bigint[]; n_prev bigint[];
    i int; j int; first int; last int; k int; all_ok boolean; req_ok boolean;
    now bigint; cost bigint; lim bigint; per bigint; cap bigint;
    st bigint; sc bigint; sp bigint;
    iv bigint; tau bigint; tat bigint; ntat bigint; start bigint; used bigint;
    wprev numeric; room bigint; need bigint;
    r_ok boolean; r_rem bigint; r_reset bigint; r_retry bigint;
    r_t bigint; r_count bigint; r_prev bigint;
    pass int;
BEGIN
    IF n = 0 THEN
        RETURN;
    END IF;
    SELECT array_agg(d.slot ORDER BY d.ord) INTO slot
    FROM (SELECT u.ord, dense_rank() OVER (ORDER BY u.k, u.e, u.p)::int AS slot
          FROM unnest(p_key, p_endpoint, p_policy) WITH ORDINALITY AS u(k, e, p, ord)) d;

    WITH src AS (
        SELECT DISTINCT ON (u.k, u.e, u.p) u.k, u.e, u.p, u.l, u.pe, u.c
        FROM unnest(p_key, p_endpoint, p_policy, p_lim, p_period, p_cap)
             AS u(k, e, p, l, pe, c)
        ORDER BY u.k, u.e, u.p
    ), up AS (
        INSERT INTO {schema}.buckets AS b (key, endpoint, policy, algorithm, lim, period, cap)
        SELECT src.k, src.e, src.p, p_alg, src.l, src.pe, src.c FROM src
        ORDER BY src.k, src.e, src.p
        ON CONFLICT (key, endpoint, policy) DO UPDATE SET seen = b.seen
        RETURNING b.key, b.endpoint, b.policy, b.algorithm, b.t, b.count, b.prev, b.seen
    )
    SELECT array_agg(up.key ORDER BY up.key, up.endpoint, up.policy),
           array_agg(up.endpoint ORDER BY up.key, up.endpoint, up.policy),
           array_agg(up.policy ORDER BY up.key, up.endpoint, up.policy),
           array_agg(up.algorithm ORDER BY up.key, up.endpoint, up.policy),
           array_agg(up.t ORDER BY up.key, up.endpoint, up.policy),
           array_agg(up.count ORDER BY up.key, up.endpoint, up.policy),
           array_agg(up.prev ORDER BY up.key, up.endpoint, up.policy),
           array_agg(up.seen ORDER BY up.key, up.endpoint, up.policy)
    INTO s_key, s_ep, s_pol, s_alg, s_t, s_count, s_prev, s_seen0
    FROM up;

    k := array_length(s_key, 1);
    s_da := array_fill(0::bigint, ARRAY[k]);
    s_dd := array_fill(0::bigint, ARRAY[k]);
    s_tier := array_fill(NULL::text, ARRAY[k]);
    s_lim := array_fill(NULL::bigint, ARRAY[k]);
    s_period := array_fill(NULL::bigint, ARRAY[k]);
    s_cap := array_fill(NULL::bigint, ARRAY[k]);
    s_ok := array_fill(true, ARRAY[k]);
    s_seen := array_fill(0::bigint, ARRAY[k]);
    FOR i IN 1..k LOOP
        IF s_alg[i] <> p_alg THEN
            s_t[i] := 0; s_count[i] := 0; s_prev[i] := 0;
        END IF;
    END LOOP;
    o_ok := array_fill(NULL::boolean, ARRAY[n]);
    o_rem := array_fill(NULL::bigint, ARRAY[n]);
    o_reset := array_fill(NULL::bigint, ARRAY[n]);
    o_retry := array_fill(NULL::bigint, ARRAY[n]);
    o_now := array_fill(NULL::bigint, ARRAY[n]);
    n_t := array_fill(NULL::bigint, ARRAY[n]);
    n_count := array_fill(NULL::bigint, ARRAY[n]);
    n_prev := array_fill(NULL::bigint, ARRAY[n]);

    first := 1;
    WHILE first <= n LOOP
        last := first;
        WHILE last < n AND p_req[last + 1] = p_req[first] LOOP
            last := last + 1;
        END LOOP;
        -- pass 1 decides each hit with its cost; pass 2 (denied request) re-reports
        -- admitting hits as peeks, since nothing is charged.
        FOR pass IN 1..2 LOOP
            all_ok := true;
            FOR i IN first..last LOOP
                IF pass = 2 AND NOT o_ok[i] THEN
                    CONTINUE;
                END IF;
                j := slot[i];
                now := coalesce(p_now[i], greatest(clock, s_seen0[j]));
                cost := CASE WHEN pass = 1 THEN p_cost[i] ELSE 0 END;
                lim := p_lim[i]; per := p_period[i]; cap := p_cap[i];
                st := s_t[j]; sc := s_count[j]; sp := s_prev[j];
                r_t := st; r_count := sc; r_prev := sp;
                IF p_alg = 'gcra' THEN
                    iv := per / lim;
                    tau := cap * iv;
                    tat := CASE WHEN st < now THEN now ELSE st END;
                    IF cost > cap THEN
                        r_ok := false; r_rem := (now + tau - tat) / iv;
                        r_reset := tat - now; r_retry := NULL;
                    ELSE
                        ntat := tat + cost * iv;
                        IF ntat - tau <= now THEN
                            r_ok := true; r_rem := (now + tau - ntat) / iv;
                            r_reset := ntat - now; r_retry := 0;
                            IF cost > 0 THEN r_t := ntat; END IF;
                        ELSE
                            r_ok := false; r_rem := (now + tau - tat) / iv;
                            r_reset := tat - now; r_retry := ntat - tau - now;
                        END IF;
                    END IF;
                ELSIF p_alg = 'fixed_window' THEN
                    start := now - now % per;
                    IF st <> start THEN sc := 0; END IF;
                    r_reset := start + per - now;
                    IF cost > lim THEN
                        r_ok := false; r_rem := lim - sc; r_retry := NULL;
                    ELSIF sc + cost <= lim THEN
                        used := sc + cost;
                        r_ok := true; r_rem := lim - used; r_retry := 0;
                        IF used = 0 THEN r_reset := 0; END IF;
                        IF cost > 0 THEN r_t := start; r_count := used; END IF;
                    ELSE
                        r_ok := false; r_rem := lim - sc; r_retry := r_reset;
                    END IF;
                ELSE
                    start := now - now % per;
                    IF st = start THEN
                        NULL;
                    ELSIF st = start - per THEN
                        sp := sc; sc := 0;
                    ELSE
                        sp := 0; sc := 0;
                    END IF;
                    wprev := sp::numeric * (per - (now - start));
                    IF cost <= lim AND wprev + (sc + cost)::numeric * per <= lim::numeric * per
                    THEN
                        used := sc + cost;
                        r_ok := true; r_retry := 0;
                        r_rem := floor((lim::numeric * per - wprev - used::numeric * per) / per);
                        r_reset := CASE WHEN used > 0 THEN start + 2 * per - now
                                        WHEN sp > 0 THEN start + per - now ELSE 0 END;
                        IF cost > 0 THEN r_t := start; r_count := used; r_prev := sp; END IF;
                    ELSE
                        r_ok := false;
                        r_rem := floor((lim::numeric * per - wprev - sc::numeric * per) / per);
                        r_reset := start + (CASE WHEN sc > 0 THEN 2 ELSE 1 END) * per - now;
                        IF cost > lim THEN
                            r_retry := NULL;
                        ELSE
                            room := lim - sc - cost;
                            need := per;
                            IF room >= 0 AND sp > 0 THEN
                                need := per - floor(room::numeric * per / sp)::bigint;
                            END IF;
                            IF need < per THEN
                                r_retry := start + need - now;
                            ELSIF sc = 0 THEN
                                r_retry := start + per - now;
                            ELSE
                                r_retry := start + per - now + greatest(
                                    per - floor((lim - cost)::numeric * per / sc)::bigint, 0);
                            END IF;
                        END IF;
                    END IF;
                END IF;
                o_ok[i] := r_ok; o_rem[i] := greatest(r_rem, 0);
                o_reset[i] := greatest(r_reset, 0);
                o_retry[i] := CASE WHEN r_retry IS NULL THEN NULL ELSE greatest(r_retry, 0) END;
                o_now[i] := now;
                n_t[i] := r_t; n_count[i] := r_count; n_prev[i] := r_prev;
                all_ok := all_ok AND r_ok;
            END LOOP;
            IF pass = 1 THEN
                req_ok := all_ok;
            END IF;
            EXIT WHEN pass = 1 AND req_ok;
            IF pass = 1 THEN
                -- denied: count it, charge nothing
                FOR i IN first..last LOOP
                    j := slot[i];
                    s_dd[j] := s_dd[j] + p_cost[i];
                    IF p_cost[i] > 0 THEN s_ok[j] := false; END IF;
                    s_seen[j] := o_now[i];
                END LOOP;
            END IF;
            EXIT WHEN pass = 2;
        END LOOP;
        IF req_ok THEN
            FOR i IN first..last LOOP
                j := slot[i];
                IF p_cost[i] > 0 THEN
                    s_t[j] := n_t[i]; s_count[j] := n_count[i]; s_prev[j] := n_prev[i];
                    s_da[j] := s_da[j] + p_cost[i];
                    s_ok[j] := true;
                    s_alg[j] := p_alg;
                END IF;
                s_seen[j] := o_now[i];
            END LOOP;
        END IF;
        FOR i IN first..last LOOP
            j := slot[i];
            s_tier[j] := p_tier[i]; s_lim[j] := p_lim[i];
            s_period[j] := p_period[i]; s_cap[j] := p_cap[i];
        END LOOP;
        first := last + 1;
    END LOOP;

    UPDATE {schema}.buckets AS b SET
        algorithm = CASE WHEN u.da > 0 THEN p_alg ELSE b.algorithm END,
        t = u.t, count = u.c, prev = u.pv,
        expires = CASE p_alg WHEN 'gcra' THEN u.t
                             WHEN 'fixed_window' THEN u.t + u.pe
                             ELSE u.t + 2 * u.pe END,
        tier = u.tier, lim = u.l, period = u.pe, cap = u.cp,
        allowed = b.allowed + u.da, denied = b.denied + u.dd,
        last_ok = u.ok, seen = greatest(b.seen, u.seen)
    FROM unnest(s_key, s_ep, s_pol, s_t, s_count, s_prev, s_tier, s_lim, s_period, s_cap,
                s_da, s_dd, s_ok, s_seen)
         AS u(k, e, p, t, c, pv, tier, l, pe, cp, da, dd, ok, seen)
    WHERE b.key = u.k AND b.endpoint = u.e AND b.policy = u.p
      AND (u.da > 0 OR u.dd > 0 OR b.lim <> u.l OR b.tier <> u.tier);

    RETURN QUERY SELECT * FROM unnest(o_ok, o_rem, o_reset, o_retry, o_now);
END
$fn$;
